"""external/glove_to_npy.py on a small generated GloVe file."""
import logging

import numpy as np
import pytest

from external.glove_to_npy import GloveError, glove_to_npy, main


def test_glove_rows_and_coverage(tmp_path, caplog):
    glove = tmp_path / "glove.txt"
    vecs = {"red": [1.0, 2.0, 3.0], "circle": [0.5, -0.5, 0.25], "a b": [7.0, 8.0, 9.0], "left": [4.0, 4.0, 4.0]}
    glove.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vecs.items()) + "red 9 9 9\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("<pad>\n<go>\n<eos>\n<unk>\nred\nblue\na b\ncircle\nsquare\n")
    out = tmp_path / "v_emb.npy"
    with caplog.at_level(logging.INFO, logger="glove_to_npy"):
        emb, missing = glove_to_npy(str(glove), str(vocab), str(out), seed=1)
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (9, 3)
    np.testing.assert_array_equal(saved, emb)
    assert not saved[0].any()
    np.testing.assert_array_equal(saved[4], vecs["red"])
    np.testing.assert_array_equal(saved[6], vecs["a b"])
    np.testing.assert_array_equal(saved[7], vecs["circle"])
    assert missing == ["blue", "square"]
    assert all(np.abs(saved[i]).sum() > 0 for i in (1, 2, 3, 5, 8))
    assert "3 of 5 vocabulary words found in GloVe (60.0%)" in caplog.text
    assert "'blue' 'square'" in caplog.text
    again, _ = glove_to_npy(str(glove), str(vocab), str(tmp_path / "again.npy"), seed=1)
    np.testing.assert_array_equal(again, emb)
    bom = tmp_path / "vocab_bom.txt"  # a Windows editor's byte-order mark must not shift or rename row 0
    bom.write_bytes(b"\xef\xbb\xbf" + vocab.read_bytes())
    with_bom, _ = glove_to_npy(str(glove), str(bom), str(tmp_path / "bom.npy"), seed=1)
    np.testing.assert_array_equal(with_bom, emb)
    assert not list(tmp_path.glob("*.tmp"))


def test_glove_errors(tmp_path, caplog):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("<pad>\n<go>\n<eos>\n<unk>\nred\n")
    assert main([str(tmp_path / "nope.txt"), str(vocab), str(tmp_path / "o.npy")]) == 1
    assert "GloVe file not found" in caplog.text
    bad = tmp_path / "bad.txt"
    bad.write_text("red 1 2 3\nblue 1 2\n")
    with pytest.raises(GloveError, match=r"bad.txt:2: 2 fields after the word, expected 3"):
        glove_to_npy(str(bad), str(vocab), str(tmp_path / "o.npy"))
    assert not (tmp_path / "o.npy").exists()
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("<pad>\nred\n")
    with pytest.raises(GloveError, match=r"foreign.txt must start with <pad>, <go>, <eos>, <unk>"):
        glove_to_npy(str(bad), str(foreign), str(tmp_path / "o.npy"))
