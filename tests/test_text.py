"""The text encoder: a tiny CLIP built from a seed is the same CLIP every time, encodes captions to
[L, D] tokens and a [D] pooled embedding independent of the batch they ride in, flags the captions
it truncates, and a name that cannot be had is one line."""

import pytest
import torch

from speed_fast.text import build_tiny_clip, load_text_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3, width=16)


def test_tiny_clip_is_deterministic_and_encodes_as_clip_does(tiny, tmp_path):
    enc = load_text_encoder(tiny)
    assert (enc.width, enc.max_tokens) == (16, 77)
    assert enc.tokenizer.tokenize("the digit seven")[-1] == "seven</w>"  # a listed word is one token
    tokens, pooled, truncated = enc.encode(["the digit seven", "", "a red cat " * 40])
    assert tokens.shape == (3, 77, 16) and pooled.shape == (3, 16) and tokens.dtype == pooled.dtype == torch.float32
    assert truncated.tolist() == [False, False, True]
    one, one_pooled, _ = enc.encode(["the digit seven"])
    assert torch.equal(one[0], tokens[0]) and torch.equal(one_pooled[0], pooled[0])
    assert not torch.equal(tokens[0], tokens[1])
    again = load_text_encoder(build_tiny_clip(tmp_path / "again", seed=3, width=16))
    assert torch.equal(again.encode(["the digit seven"])[0], one)
    other = load_text_encoder(build_tiny_clip(tmp_path / "other", seed=4, width=16))
    assert not torch.equal(other.encode(["the digit seven"])[0], one)


def test_unknown_text_encoder_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--text-encoder '\./nowhere': no such directory"):
        load_text_encoder("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a directory without config.json"):
        load_text_encoder(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1 forbids downloading it") as err:
        load_text_encoder("nobody/no-such-clip")
    assert "\n" not in str(err.value)


def test_a_clip_model_directory_gives_its_text_tower(tiny, tmp_path):
    """A save_pretrained CLIPModel (text + vision, as CLIP score needs) loads as the text encoder of its text tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    text = load_text_encoder(tiny)
    cfg = CLIPConfig(text_config=text.model.config.to_dict(), projection_dim=16,
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=8, patch_size=4))
    full = CLIPModel(cfg)
    full.text_model.load_state_dict(text.model.state_dict())
    full.save_pretrained(tmp_path / "full")
    CLIPTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "full")
    got = load_text_encoder(str(tmp_path / "full"))
    assert torch.equal(got.encode(["a handwritten seven"])[1], text.encode(["a handwritten seven"])[1])
