import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_gguf.text import (
    chunk_text,
    cut_between_words,
    is_blank,
    split_sentences,
    take_sentences,
    take_sentences_within,
)


def tokens(text: str) -> int:
    """A token-like counter: words in pieces of up to 4 characters, a leading space belongs
    to the piece after it, punctuation runs are pieces; so a join can count less than its
    parts do separately, as with BPE."""
    return len(re.findall(r" ?\w{1,4}| ?[^\w\s]+|\s+", text))


# --- split_sentences -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, sentences",
    [
        (
            "Mr. Smith and Mrs. Jones met Dr. Who at St. Paul's. Prof. X came too.",
            ["Mr. Smith and Mrs. Jones met Dr. Who at St. Paul's.", "Prof. X came too."],
        ),
        (
            "Fruit, e.g. apples, i.e. red ones. Apples vs. Pears is a game. "
            "I like pears etc. and more.",
            [
                "Fruit, e.g. apples, i.e. red ones.",
                "Apples vs. Pears is a game.",
                "I like pears etc. and more.",
            ],
        ),
        (
            "Pi is 3.14159. E is 2.718. It costs $5. Then stop.",
            ["Pi is 3.14159.", "E is 2.718.", "It costs $5.", "Then stop."],
        ),
        (
            "J. R. R. Tolkien wrote it. George R. R. Martin too. "
            "The U.S. Army came at 5 p.m. today.",
            [
                "J. R. R. Tolkien wrote it.",
                "George R. R. Martin too.",
                "The U.S. Army came at 5 p.m. today.",
            ],
        ),
        (
            "See Fig. 3 and No. 5 on pp. 12. I said no. Then I left.",
            ["See Fig. 3 and No. 5 on pp. 12.", "I said no.", "Then I left."],
        ),
        ("It ended in 1999. 2000 was better.", ["It ended in 1999.", "2000 was better."]),
        # A numbered list (as language models answer): its numbers are not sentences of their own.
        ("1. First item\n2. Second item.\n10. Tenth. Done.", ["1. First item", "2. Second item.", "10. Tenth.",
                                                          "Done."]),
        ("Then: 1. Open it. 2. Close it.", ["Then: 1.", "Open it.", "2. Close it."]),
        (
            '"Stop!" she cried. "Why?" He shrugged. \'Fine.\' (He did.) [Done.] Next.',
            [
                '"Stop!" she cried.',
                '"Why?"',
                "He shrugged.",
                "'Fine.'",
                "(He did.)",
                "[Done.]",
                "Next.",
            ],
        ),
        ("“Really?” “Yes.” «Oui.» Bon.", ["“Really?”", "“Yes.”", "«Oui.»", "Bon."]),
        (
            "Wait... what? Well… Maybe later... or never. Really?! Yes!!! ¿Qué? No.",
            [
                "Wait... what?",
                "Well…",
                "Maybe later... or never.",
                "Really?!",
                "Yes!!!",
                "¿Qué?",
                "No.",
            ],
        ),
        (
            "Visit example.com/a.b?c=1 now. Dr.Who is here.",
            ["Visit example.com/a.b?c=1 now.", "Dr.Who is here."],
        ),
        (
            "Title\nFirst line. Second\r\n\n\n  Third  \n",
            ["Title", "First line.", "Second", "Third"],
        ),
        ("  a  bb\t cc.   D \u00a0 e  ", ["a bb cc.", "D e"]),
        ("", []),
        (" \n\n\t ", []),
        ("No end", ["No end"]),
        ("你好。世界！今天天气很好吗？是的｡", ["你好。", "世界！", "今天天气很好吗？", "是的｡"]),
        (
            "他说：“好的。”然后走了。「行こう。」と言った。（終わり。）次。",
            ["他说：“好的。”然后走了。", "「行こう。」と言った。", "（終わり。）次。"],
        ),
        ("数字是３．１４。好。", ["数字是３．１４。", "好。"]),
        ("Hello. 你好。 Bye.", ["Hello.", "你好。", "Bye."]),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_split_a_long_paragraph():
    templates = [
        "Dr. Lee paid {i}.{i} dollars for item No. {i}, e.g. a lamp.",
        "Was {i} enough?",
        'She said "Wow, {i}!" and left.',
        "J. K. bought {i} books at 3 p.m. on Main St. yesterday.",
        "Hmm... again {i}…",
        "(See section {i}.)",
    ]
    expected = [templates[i % len(templates)].format(i=i) for i in range(45)]
    paragraph = "  ".join(expected)
    assert "\n" not in paragraph
    assert split_sentences(paragraph) == expected
    for sentence in expected:
        assert split_sentences(sentence) == [sentence]


_ATOMS = [
    "Mr.",
    "Dr.",
    "e.g.",
    "3.14",
    "word",
    "Word",
    "and",
    "J.",
    ",",
    ".",
    "!",
    "?",
    "…",
    "...",
    '"',
    "(",
    ")",
    "\n",
    "\n\n",
    "。",
    "你好",
    "」",
    "——",
    ":",
    ";",
    "Supercalifragilistic",
    "\r\n",
    "\u2028",
    "「",
    "Dr.",
    "नमस्ते।",
    "؟",
]
TEXTS = st.lists(
    st.tuples(st.sampled_from(_ATOMS), st.sampled_from(["", " ", "  ", "\t"])), max_size=60
).map(lambda parts: "".join(a + s for a, s in parts))


def _visible(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=150, deadline=None)
@given(TEXTS)
def test_split_keeps_every_character_in_order(text):
    sentences = split_sentences(text)
    assert _visible("".join(sentences)) == _visible(text)
    for s in sentences:
        assert s and s == " ".join(s.split())


def test_invisible_characters_alone_say_nothing():
    assert is_blank("") and is_blank(" \t\n") and is_blank("\u200b\u200d\ufeff\x00 \u2060")
    assert not is_blank("\u200bHi") and not is_blank("…") and not is_blank("日本")
    assert split_sentences("Hello. \u200b\u200b\n\u200b\nBye.") == ["Hello.", "Bye."]


# --- chunk_text ------------------------------------------------------------------------


def test_chunk_groups_whole_sentences():
    text = "One. Two two. Three three three. Four. Five five five five five."
    assert chunk_text(text, 25) == [
        "One. Two two.",
        "Three three three. Four.",
        "Five five five five five.",
    ]
    assert chunk_text(text, 1000) == [text]
    assert chunk_text("", 10) == [] and chunk_text(" \n ", 10) == []


def test_chunk_cuts_long_sentences_at_clauses_then_words_then_letters():
    text = "Short. One two three, four five six; seven eight: nine ten — eleven twelve thirteen."
    assert chunk_text(text, 24) == [
        "Short. One two three,",
        "four five six;",
        "seven eight: nine ten —",
        "eleven twelve thirteen.",
    ]
    assert chunk_text("One two three four five six seven.", 15) == [
        "One two three",
        "four five six",
        "seven.",
    ]
    assert chunk_text("Supercalifragilistic is long.", 8) == [
        "Supercal",
        "ifragili",
        "stic is",
        "long.",
    ]


def test_chunk_does_not_cut_numbers_or_addresses_at_their_punctuation():
    text = "It was 1,234,567,890 dollars at example.com:8080/x, they said; then it ended."
    assert chunk_text(text, 30) == [
        "It was 1,234,567,890 dollars",
        "at example.com:8080/x,",
        "they said; then it ended.",
    ]


def test_chunk_uses_the_given_counter():
    text = "Antidisestablishmentarianism is long. So is floccinaucinihilipilification."
    assert chunk_text(text, 30) == [  # by characters
        "Antidisestablishmentarianism",
        "is long. So is",
        "floccinaucinihilipilification.",
    ]
    assert chunk_text(text, 40, count=lambda s: len(s.split())) == [text]
    # 7 + 1 tokens, then 2 + 2; the last word alone counts 8 and its period one more.
    assert chunk_text(text, 8, count=tokens) == [
        "Antidisestablishmentarianism is",
        "long. So is",
        "floccinaucinihilipilification",
        ".",
    ]


def test_chunk_cjk_without_spaces():
    assert chunk_text("你好。世界！今天天气很好吗？", 100) == ["你好。世界！今天天气很好吗？"]
    assert chunk_text("你好。世界！今天天气很好吗？", 6) == ["你好。世界！", "今天天气很好", "吗？"]
    assert chunk_text("我们今天去公园，然后去商店，最后回家。", 8) == [
        "我们今天去公园，",
        "然后去商店，",
        "最后回家。",
    ]


def test_chunk_rejects_impossible_limits():
    with pytest.raises(ValueError, match="max_units"):
        chunk_text("Hi.", 0)
    with pytest.raises(ValueError, match="'x'"):
        chunk_text("x y", 1, count=lambda s: 2 * len(s))


@settings(max_examples=150, deadline=None)
@given(TEXTS, st.integers(1, 40), st.sampled_from([len, tokens]))
def test_chunk_limits_and_content(text, max_units, count):
    chunks = chunk_text(text, max_units, count)
    assert chunk_text(text, max_units, count) == chunks  # deterministic
    for chunk in chunks:
        assert chunk and chunk == chunk.strip()
        assert count(chunk) <= max_units
    assert _visible("".join(chunks)) == _visible(text)


_WORDS = st.lists(
    st.sampled_from(
        ["a", "be", "cat", "dogs", "eagle", "Mr.", "3.14", "end.", "what?", "so,", "now;", "—"]
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_WORDS, st.integers(6, 40), st.sampled_from([len, tokens]))
def test_chunk_cuts_between_words_and_packs_greedily(words, max_units, count):
    # Every word fits the limit, so no word may be cut, and two neighbouring chunks never
    # fit together (else the packing was not greedy).
    text = " ".join(words)
    chunks = chunk_text(text, max_units, count)
    assert " ".join(chunks).split() == words
    for a, b in zip(chunks, chunks[1:]):
        assert count(a + " " + b) > max_units


def incremental_sentences(chunks: list[str]) -> list[str]:
    done, rest = [], ""
    for chunk in chunks:
        sentences, rest = take_sentences(rest + chunk)
        done += sentences
    return done + take_sentences(rest, final=True)[0]


# Zero-width characters alone make blank sentences, which are dropped (not spoken), as whole texts have them.
TEXTS_WITH_INVISIBLES = st.lists(
    st.tuples(st.sampled_from([*_ATOMS, "\u200b", "\ufeff"]), st.sampled_from(["", " ", "\t"])), max_size=60
).map(lambda parts: "".join(a + s for a, s in parts))


@settings(max_examples=300, deadline=None)
@given(TEXTS_WITH_INVISIBLES, st.lists(st.integers(0, 200), max_size=12))
def test_sentences_of_text_in_pieces_are_those_of_the_whole(text, cuts):
    """Text arriving in pieces (a websocket, an LLM's tokens) is cut into the same sentences."""
    cuts = sorted(c % (len(text) + 1) for c in cuts)
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert incremental_sentences(chunks) == split_sentences(text)


@pytest.mark.parametrize("chunks", [
    ['He said:\n"', 'Go home."'],  # the line break ended "He said:", whatever follows
    ["Shopping list:\n(", "eggs and milk)"],
    ["Hello. ", "\u200b", "World."],  # the space before the zero-width one is kept
    ["}\x85("],
])
def test_sentences_of_text_in_these_pieces_are_those_of_the_whole(chunks):
    assert incremental_sentences(chunks) == split_sentences("".join(chunks))


def test_sentence_ends_of_other_scripts():
    assert split_sentences("यह एक वाक्य है। यह दूसरा है।") == ["यह एक वाक्य है।", "यह दूसरा है।"]
    assert split_sentences("هل أنت بخير؟ نعم.") == ["هل أنت بخير؟", "نعم."]
    assert split_sentences("これはペンです。Dr. Smith came.") == ["これはペンです。", "Dr. Smith came."]


@pytest.mark.parametrize("text", ["Hi. (and so) it went.", "Mr. Smith is here. Yes.", "「行こう。」と言った。次。",
                                  "No. 5 is on p. 12. Fine.", "He said \"Stop.\" Then left.",
                                  "Line one\u2028line two\rthree\r\nfour \n \n five"])
def test_sentences_of_text_one_character_at_a_time(text):
    assert incremental_sentences(list(text)) == split_sentences(text)


def test_take_sentences_within_cuts_text_that_never_ends_a_sentence():
    text = "One. Two " + "word " * 30
    sentences, rest = take_sentences_within(text, 40)
    assert sentences[0] == "One." and len(sentences) > 1 and all(len(s) <= 40 for s in sentences)
    assert len(rest) <= 40 and " ".join([*sentences, rest]).split() == text.split()  # nothing lost, in order
    assert all(set(piece.split()) <= {"One.", "Two", "word"} for piece in [*sentences, rest])  # no word cut in two
    assert cut_between_words("abcdefghij " * 3, 25) == ("abcdefghij abcdefghij", "abcdefghij ")
    assert cut_between_words("a" * 30, 25) == ("a" * 25, "a" * 5)  # no space to cut at: at the limit
    assert take_sentences_within("One. Two words", 40) == take_sentences("One. Two words")
