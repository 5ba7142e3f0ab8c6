"""Views: read a study, never steer it. Live progress, experiment tracking, the HTML report, the dashboard."""
