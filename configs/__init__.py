"""Configurations for train.py (ml_collections ConfigDicts, one file per setting)."""
