"""`vitexp.config.nodes`: the one walk over a config's nested keys, and what is built on it."""

from __future__ import annotations

from omegaconf import OmegaConf

from vitexp.config import flat_keys, leaves, missing_keys, walk

NODE = {"a": {"b": 1, "c": {"d": [1, {"x": 2}]}}, "e": "???", "f": {}, "g": "${a.b}"}


def test_walk_gives_every_key_sections_first_lists_as_values():
    assert [key for key, _ in walk(NODE)] == ["a", "a.b", "a.c", "a.c.d", "e", "f", "g"]
    assert dict(walk(NODE))["a.c.d"] == [1, {"x": 2}]
    assert [key for key, _ in walk(NODE["a"], "a")] == ["a.b", "a.c", "a.c.d"]


def test_leaves_are_the_settings_unresolved():
    expected = {"a.b": 1, "a.c.d": [1, {"x": 2}], "e": "???", "g": "${a.b}"}
    assert leaves(NODE) == expected
    assert leaves(OmegaConf.create(NODE)) == expected


def test_flat_keys_and_missing_keys():
    cfg = OmegaConf.create({**NODE, "hydra": {"h": "???"}, "m": "${e}"})
    assert flat_keys(cfg) == ["a", "a.b", "a.c", "a.c.d", "e", "f", "g", "hydra", "hydra.h", "m"]
    # an interpolation to a missing value is not itself missing (OmegaConf.missing_keys raises)
    assert missing_keys(cfg) == ["e"]
