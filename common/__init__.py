"""Plumbing shared by every script (data, views, processes, logging, checkpoints); no method is defined here."""
