"""UMT5Encoder: original-key loading against a re-derivation of Wan2.1's T5 encoder, tokenizers, folders."""
import pytest
import torch

pytest.importorskip("transformers")

from wan_original.t5 import wan_text_context  # noqa: E402

from deepforcing_kernels.video import ByteTokenizer, UMT5Encoder  # noqa: E402
from deepforcing_kernels.video.t5 import original_to_hf_key, random_original_state_dict  # noqa: E402

CFG = dict(vocab=300, dim=24, dim_attn=32, dim_ffn=40, num_heads=4, num_layers=3, num_buckets=32)


def _ids(lengths, n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, v in enumerate(lengths):
        ids[i, :v] = torch.randint(1, vocab, (v,), generator=g)
        mask[i, :v] = 1
    return ids, mask


@pytest.mark.parametrize("shared_pos", [False, True], ids=["umt5", "t5-shared-pos"])
def test_encode_ids_matches_original(shared_pos):
    cfg = dict(CFG, shared_pos=shared_pos)
    sd = random_original_state_dict(seed=1, **cfg)
    enc = UMT5Encoder.from_original(sd, text_len=80, **cfg)
    # rows longer than max_exact (8) and than max_distance's log range; one full row, one of length 1
    ids, mask = _ids([60, 5, 1, 64], 64, cfg["vocab"])
    out = enc.encode_ids(ids, mask)
    want = wan_text_context(sd, ids, mask, 80, num_heads=4, num_layers=3, num_buckets=32, shared_pos=shared_pos)
    assert out.shape == (4, 80, 24)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out[1, 5:].abs().max() == 0 and out[1, :5].abs().min() > 0
    # the per-block position tables matter (umT5): a model whose blocks share table 0 differs
    if not shared_pos:
        sd2 = dict(sd)
        for i in range(1, 3):
            sd2[f"blocks.{i}.pos_embedding.embedding.weight"] = sd["blocks.0.pos_embedding.embedding.weight"]
        assert (UMT5Encoder.from_original(sd2, text_len=80, **cfg).encode_ids(ids, mask) - out).abs().max() > 1e-3


def test_padding_does_not_leak():
    """A row's encodings depend on its valid tokens only (padding ids and length are masked out)."""
    enc = UMT5Encoder.tiny(seed=0, text_len=20)
    ids, mask = _ids([7], 12, 300, seed=3)
    a = enc.encode_ids(ids, mask)
    ids2 = ids.clone()
    ids2[0, 7:] = 99
    b = enc.encode_ids(torch.cat([ids2, torch.zeros(1, 8, dtype=torch.long)], 1),
                       torch.cat([mask, torch.zeros(1, 8, dtype=torch.long)], 1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_key_names_real_size():
    from transformers import UMT5Config, UMT5EncoderModel
    with torch.device("meta"):
        m = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                        num_heads=64, relative_attention_num_buckets=32))
    own = set(m.state_dict()) - {"encoder.embed_tokens.weight"}
    from deepforcing_kernels.video.t5 import UMT5_XXL_CONFIG, original_state_dict_shapes
    names = {original_to_hf_key(k) for k in original_state_dict_shapes(**UMT5_XXL_CONFIG)}
    assert names == own
    assert original_to_hf_key("blocks.3.ffn.gate.0.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_0.weight"
    assert original_to_hf_key("blocks.3.ffn.fc1.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_1.weight"


def test_byte_tokenizer_matches_byt5():
    from transformers import ByT5Tokenizer
    ref = ByT5Tokenizer()
    tok = ByteTokenizer(text_len=12, clean=False)
    for text in ["a red fox", "héllo wörld, 日本", "x" * 30, ""]:
        want = ref(text, padding="max_length", truncation=True, max_length=12)
        ids, mask = tok([text])
        assert ids[0].tolist() == want["input_ids"], text
        assert mask[0].tolist() == want["attention_mask"], text
    ids, mask = ByteTokenizer(text_len=16)(["  a \n\t red   fox  ", "a red fox"])
    assert torch.equal(ids[0], ids[1]) and int(mask[0].sum()) == 10


def test_tiny_call():
    enc = UMT5Encoder.tiny(seed=0)
    emb = enc(["a red fox", "a much longer prompt than sixteen bytes"])
    assert emb.shape == (2, 16, 32)
    assert emb[0, 10:].abs().max() == 0 and emb[0, :10].abs().min() > 0  # 9 bytes + </s>
    assert emb[1].abs().min() > 0  # truncated to 16 valid tokens
    with pytest.raises(ValueError, match="non-empty"):
        enc([])


def _tokenizer_folder(path):
    """A small real tokenizer folder (tokenizer.json + tokenizer_config.json), as in diffusers' tokenizer/."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "runs"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))


def test_diffusers_folder_and_tokenizer(tmp_path):
    cfg = dict(CFG, shared_pos=False)
    sd = random_original_state_dict(seed=2, **cfg)
    enc = UMT5Encoder.from_original(sd, text_len=10, **cfg)
    enc.model.save_pretrained(str(tmp_path / "text_encoder"))
    # tokenizer missing: loads, then a call names the missing files
    loaded = UMT5Encoder.from_pretrained(tmp_path, text_len=10)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        loaded(["a red fox"])
    _tokenizer_folder(tmp_path / "tokenizer")
    loaded = UMT5Encoder.from_pretrained(tmp_path / "text_encoder", text_len=10)
    ids, mask = loaded.tokenize(["a  red fox", "fox"])
    assert ids[0, :4].tolist() == [3, 4, 5, 1] and mask[0].tolist() == [1] * 4 + [0] * 6
    torch.testing.assert_close(loaded(["a red fox"]), enc.encode_ids(ids[:1], mask[:1]), atol=1e-6, rtol=0)
    # original layout: the tokenizer is found in google/umt5-xxl/ beside the .pth
    torch.save(sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    orig = UMT5Encoder.from_original(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", text_len=10, **cfg)
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl/tokenizer_config.json"):
        orig(["a red fox"])
    _tokenizer_folder(tmp_path / "google" / "umt5-xxl")
    orig = UMT5Encoder.from_original(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", text_len=10, **cfg)
    torch.testing.assert_close(orig(["a red fox"]), loaded(["a red fox"]), atol=1e-6, rtol=0)


def test_bad_inputs(tmp_path):
    cfg = dict(CFG, shared_pos=False)
    sd = random_original_state_dict(seed=2, **cfg)
    with pytest.raises(ValueError, match=r"unexpected \(1\): blocks.0.extra.*missing \(1\)"):
        bad = dict(sd)
        bad["blocks.0.extra"] = bad.pop("blocks.2.norm2.weight")
        UMT5Encoder.from_original(bad, **cfg)
    with pytest.raises(ValueError, match="expects"):
        UMT5Encoder.from_original(sd, **dict(cfg, dim_ffn=48))
    with pytest.raises(TypeError, match="unknown config"):
        UMT5Encoder.from_original(sd, hidden=3, **cfg)
    enc = UMT5Encoder.from_original(sd, text_len=10, **cfg)
    with pytest.raises(ValueError, match="transformers' layout"):
        UMT5Encoder.from_original(enc.model.state_dict(), **cfg)
    with pytest.raises(ValueError, match="text_len"):
        enc.encode_ids(*_ids([3], 12, 300))
    with pytest.raises(ValueError, match="vocabulary"):
        enc.encode_ids(torch.full((1, 4), 300), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="from_original"):
        torch.save(sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
        UMT5Encoder.from_pretrained(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or spiece.model"):
        enc.set_tokenizer(tmp_path / "tok")
