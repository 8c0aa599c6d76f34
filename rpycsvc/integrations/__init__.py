"""Integrations with code people already have: joblib (``import rpycsvc.joblib``) and
IPython/Jupyter."""
