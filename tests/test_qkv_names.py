"""The q/k/v block helpers the fuser, the converter and the example files share (keys/aliases.py)."""

from __future__ import annotations

from zimage_lora.keys.aliases import qkv_block, qkv_groups, qkv_names


def test_block_of_each_projection_and_none_elsewhere():
    assert qkv_block("layers.3.attention.to_k") == "layers.3."
    assert qkv_block("noise_refiner.0.attention.to_v") == "noise_refiner.0."
    assert qkv_block("layers.3.attention.to_out.0") is None
    assert qkv_names("layers.3.") == ("layers.3.attention.to_q", "layers.3.attention.to_k", "layers.3.attention.to_v")


def test_groups_only_whole_blocks_in_order_of_q():
    names = ["layers.1.attention.to_v", "layers.1.attention.to_q", "layers.0.attention.to_q",
             "layers.0.attention.to_k", "layers.1.attention.to_k", "layers.0.feed_forward.w1"]
    assert qkv_groups(names) == [qkv_names("layers.1.")]
    assert qkv_groups(iter([*names, "layers.0.attention.to_v"])) == [qkv_names("layers.1."), qkv_names("layers.0.")]
