"""Stage 1, config: the study YAML and the search-space file read into typed objects, checked once at the edge.

``hyperparameters`` declares every ``train:`` setting once (type, domain, default, help, searchable, what in the
recipe reads it); ``study`` holds the other sections, the checks across them and the entry points; ``yamlfile``
reads YAML files with bounds and applies ``--set``; ``typed`` walks a raw mapping into a dataclass.
Nothing here imports torch.
"""
