"""util/wordpiece.py: BERT uncased WordPiece against the golden SaG run's tokenisation (transformers 4.33
BertTokenizer on the golden's tiny vocabulary: basic tokens, word pieces, ids) and SaG's collate (the golden
batches), plus the BasicTokenizer rules the golden sentences do not reach."""
import json

import numpy as np
import pytest

from util import wordpiece


@pytest.fixture(scope="module")
def sag_golden(golden_dir):
    folder = golden_dir / "sag"
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    data = np.load(folder / "golden_sag.npz")
    return manifest, {k: data[k] for k in ("input__txt", "input__txt_len", "input__ids", "train__input_txt",
                                           "train__input_txt_len")}


@pytest.fixture()
def tokenizer(sag_golden, tmp_path):
    manifest, _ = sag_golden
    path = tmp_path / "vocab.txt"
    path.write_text("".join(token + "\n" for token in manifest["vocab"]), encoding="utf-8")
    return wordpiece.WordPiece(path)


def test_golden_sentences(sag_golden, tokenizer):
    manifest, _ = sag_golden
    for record in manifest["tokenization"]:
        assert wordpiece.basic_tokens(record["sentence"]) == record["basic_tokens"]
        assert tokenizer.wordpieces(record["sentence"]) == record["wordpieces"]
        assert tokenizer.caption_ids(record["sentence"]) == record["ids"]
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 100, 101, 102)


def test_golden_batches(sag_golden, tokenizer):
    """``collate_fn``: longest first (stable), 0-padded; the golden's val batch is samples [1, 0]."""
    manifest, npz = sag_golden
    for split, key in (("val", "input__"), ("train", "train__input_")):
        records = sorted((r for r in manifest["tokenization"] if r["split"] == split), key=lambda r: r["index"])
        order, ids, lengths = wordpiece.collate([tokenizer.caption_ids(r["sentence"]) for r in records])
        assert np.array_equal(ids, npz[key + "txt"]) and np.array_equal(lengths, npz[key + "txt_len"])
        if split == "val":
            assert order == npz["input__ids"].tolist()
    assert wordpiece.collate([[101, 7, 102], [101, 8, 102], [101, 102]])[0] == [0, 1, 2]


def test_basic_tokenizer_rules():
    assert wordpiece.basic_tokens("Héllo,\tWORLD!\u00a0x") == ["hello", ",", "world", "!", "x"]
    assert wordpiece.basic_tokens("a\x00b\ufffdc\u200bd") == ["abcd"]            # NUL, U+FFFD, Cf dropped
    assert wordpiece.basic_tokens("猫dog") == ["猫", "dog"]                       # CJK ideographs split off
    assert wordpiece.basic_tokens("x$y^z~w¿") == ["x", "$", "y", "^", "z", "~", "w", "¿"]
    assert wordpiece.basic_tokens("[CLS] it") == ["[", "cls", "]", "it"]        # no never-split set in SaG
    assert wordpiece.basic_tokens("e\u0301") == ["e"]                           # NFC then NFD accent strip
    assert wordpiece.basic_tokens("  ") == []


def test_wordpiece_rules(tokenizer):
    assert tokenizer.word_pieces("sitting") == ["sit", "##t", "##ing"]
    assert tokenizer.word_pieces("qqq") == ["[UNK]"]                            # cannot be covered
    assert tokenizer.word_pieces("dog" * 34) == ["[UNK]"]                       # 102 characters > 100
    assert tokenizer.ids(["[UNK]", "never-seen"]) == [100, 100]


def test_vocabulary_errors_are_one_line(tmp_path):
    missing = tmp_path / "none.txt"
    with pytest.raises(FileNotFoundError, match=r"^.*none\.txt: no such file [^\n]*$"):
        wordpiece.WordPiece(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n[UNK]\n[CLS]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^.*bad\.txt: not a BERT vocabulary \(no \[SEP\] token\)$"):
        wordpiece.WordPiece(bad)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"^.*bin\.txt: not a UTF-8 vocabulary"):
        wordpiece.WordPiece(binary)
