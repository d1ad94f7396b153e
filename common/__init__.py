"""Plumbing shared by every script: data and views, distributed setup, logging, checkpoints.

Nothing in here defines a method. See DESIGN notes in the README ("Layout").
"""
