"""Background training jobs and their HTTP routes."""
