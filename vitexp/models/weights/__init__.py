"""Importing weights from other layouts into vitexp models."""

from vitexp.models.weights.vit import check_state_dict_fits, load_pretrained

__all__ = ["check_state_dict_fits", "load_pretrained"]
