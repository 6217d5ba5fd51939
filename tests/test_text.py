"""util/text.py: the original tokenizer's quirks (spec §1.6) on the real Gref vocabulary."""
import pytest

from util.text import load_vocab_dict_from_file, preprocess_sentence, sentence2vocab_indices, tokenize


@pytest.fixture(scope="module")
def vocab_path(shared_dir):
    return shared_dir / "data" / "vocabulary_Gref.txt"


@pytest.fixture(scope="module")
def vocab(vocab_path):
    return load_vocab_dict_from_file(vocab_path)


def test_vocabulary_file(vocab_path, vocab):
    with open(vocab_path, encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 12112
    assert len(vocab) == 12107
    assert vocab["."] == 6108
    assert [vocab[w] for w in ("<pad>", "<go>", "<eos>", "<unk>")] == [0, 1, 2, 3]


@pytest.mark.parametrize("sentence,tail", [
    ("man in red.", [6950, 6530, 3096]),
    ("The man's hat, left", [3603, 6950, 2590, 1260, 603, 3, 6577]),
    ("red .", [3096, 3]),
])
def test_spec_examples(vocab, sentence, tail):
    assert preprocess_sentence(sentence, vocab) == [0] * (20 - len(tail)) + tail


def test_quirks(vocab):
    assert tokenize("The man's hat, left") == ["the", "man", "'", "s", "hat", ", ", "left"]
    assert preprocess_sentence(".", vocab) == [0] * 20
    assert tokenize("café") == ["caf", "é"]
    long = " ".join(["red"] * 25 + ["man"])
    assert preprocess_sentence(long, vocab) == [3096] * 20
    assert sentence2vocab_indices("man . red", vocab) == [6950, 3, 3096]


@pytest.mark.parametrize("sentence", ["", "   "])
def test_empty_sentence(vocab, sentence):
    with pytest.raises(ValueError, match="empty sentence"):
        preprocess_sentence(sentence, vocab)
