"""Policy: YAML → frozen model → compiled index → Decision; pure except store.py."""
