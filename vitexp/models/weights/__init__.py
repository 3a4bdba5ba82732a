"""Importing weights from other layouts into vitexp models."""
