"""Player names people can trust: one form per name, one script per name (pure).

A name as a client typed it becomes its *canonical* form before it is
claimed, looked up or compared: Unicode NFKC (``ada`` in fullwidth letters,
U+FF41 U+FF44 U+FF41, is ``ada``; ligatures and other compatibility forms
become plain letters), then trimmed of white space at both ends. The
canonical form must then be:

- 1 to :data:`MAX_NAME_CHARS` characters;
- letters, combining marks after a letter, digits and ``_ - .``: no spaces,
  no symbols, no control or invisible characters (zero-width joiners,
  direction marks, variation selectors, Hangul fillers);
- of one script: every letter (and every digit that is not 0-9) Latin, or
  every one Cyrillic, or Greek, Arabic, ...; Chinese, Japanese and Korean
  scripts count as one, as they mix in real names. A Latin name with a
  Cyrillic a (U+0430) is refused, whatever it looks like.

:func:`look_alike` is the name's *skeleton*: case folded, with the Cyrillic
and Greek letters that look Latin read as Latin. A new name whose skeleton is
an existing name's (``Ada``, or ``ada`` written all in Cyrillic, beside ``ada``)
is refused by whoever keeps the accounts (:mod:`meshd.players.accounts`).

Python's :mod:`unicodedata` knows no scripts; a letter's script is the first
word of its Unicode name (``LATIN SMALL LETTER A``, ``CYRILLIC SMALL LETTER
A``), which is what the rule needs: strict for the rare letters whose name
starts otherwise (they count as a script of their own).
"""

from __future__ import annotations

import unicodedata

MAX_NAME_CHARS = 32
"""Characters in a canonical name."""
PUNCTUATION = frozenset("_-.")
MAX_MARKS = 2
"""Combining marks in a row after a letter (more is a pile-up, not a name)."""
EAST_ASIAN = frozenset(
    {"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC"}
)
"""Scripts that mix in real names (kanji and kana, hanja and hangul): one script here."""
INVISIBLE = frozenset(
    [
        0x034F,  # combining grapheme joiner
        0x115F,  # Hangul fillers
        0x1160,
        0x3164,
        0xFFA0,
        0x17B4,  # Khmer inherent vowels
        0x17B5,
        *range(0x180B, 0x1810),  # Mongolian variation selectors
        *range(0xFE00, 0xFE10),  # variation selectors
        *range(0xE0100, 0xE01F0),
    ]
)
"""Characters that draw nothing yet are letters or marks (the rest of Unicode's
default-ignorable characters are format or control characters, refused as such)."""
LOOK_LATIN = str.maketrans(
    {
        unicodedata.lookup(name): latin
        for name, latin in (
            ("CYRILLIC SMALL LETTER A", "a"),
            ("CYRILLIC SMALL LETTER VE", "b"),
            ("CYRILLIC SMALL LETTER IE", "e"),
            ("CYRILLIC SMALL LETTER IO", "e"),
            ("CYRILLIC SMALL LETTER ZE", "3"),
            ("CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I", "i"),
            ("CYRILLIC SMALL LETTER YI", "i"),
            ("CYRILLIC SMALL LETTER JE", "j"),
            ("CYRILLIC SMALL LETTER KA", "k"),
            ("CYRILLIC SMALL LETTER EM", "m"),
            ("CYRILLIC SMALL LETTER EN", "h"),
            ("CYRILLIC SMALL LETTER O", "o"),
            ("CYRILLIC SMALL LETTER ER", "p"),
            ("CYRILLIC SMALL LETTER ES", "c"),
            ("CYRILLIC SMALL LETTER TE", "t"),
            ("CYRILLIC SMALL LETTER U", "y"),
            ("CYRILLIC SMALL LETTER HA", "x"),
            ("CYRILLIC SMALL LETTER DZE", "s"),
            ("CYRILLIC SMALL LETTER SHHA", "h"),
            ("CYRILLIC SMALL LETTER KOMI DE", "d"),
            ("CYRILLIC SMALL LETTER QA", "q"),
            ("CYRILLIC SMALL LETTER WE", "w"),
            ("CYRILLIC SMALL LETTER PALOCHKA", "l"),
            ("CYRILLIC SMALL LETTER STRAIGHT U", "y"),
            ("CYRILLIC SMALL LETTER IZHITSA", "v"),
            ("GREEK SMALL LETTER ALPHA", "a"),
            ("GREEK SMALL LETTER BETA", "b"),
            ("GREEK SMALL LETTER EPSILON", "e"),
            ("GREEK SMALL LETTER ZETA", "z"),
            ("GREEK SMALL LETTER ETA", "h"),
            ("GREEK SMALL LETTER IOTA", "i"),
            ("GREEK SMALL LETTER KAPPA", "k"),
            ("GREEK SMALL LETTER MU", "m"),
            ("GREEK SMALL LETTER NU", "v"),
            ("GREEK SMALL LETTER OMICRON", "o"),
            ("GREEK SMALL LETTER RHO", "p"),
            ("GREEK SMALL LETTER TAU", "t"),
            ("GREEK SMALL LETTER UPSILON", "u"),
            ("GREEK SMALL LETTER CHI", "x"),
            ("GREEK SMALL LETTER OMEGA", "w"),
            ("GREEK SMALL LETTER GAMMA", "y"),
        )
    }
)
"""Lower-case Cyrillic and Greek letters read as the Latin letter they pass for."""


class BadName(ValueError):
    """A name the rule refuses; the message says which part of the rule."""


def canonical_name(raw: str) -> str:
    """``raw`` as it is claimed and compared (NFKC, trimmed), or :class:`BadName` saying why not."""
    name = unicodedata.normalize("NFKC", raw).strip()
    if not name:
        raise BadName("a name needs at least one letter or digit")
    if len(name) > MAX_NAME_CHARS:
        raise BadName(f"a name is at most {MAX_NAME_CHARS} characters; {name!r} has {len(name)}")
    scripts: dict[str, str] = {}
    marks = 0
    for index, char in enumerate(name):
        category = unicodedata.category(char)
        if category[0] in "CZ" or ord(char) in INVISIBLE:
            what = "a space" if category[0] == "Z" else "a control or invisible character"
            raise BadName(f"{_show(char)} in {name!r} is {what}: names have none")
        if category[0] == "M":
            marks += 1
            if index == 0 or marks > MAX_MARKS:
                raise BadName(
                    f"{_show(char)} in {name!r}: a name has at most {MAX_MARKS} combining "
                    "marks after each letter, and starts with a letter or digit"
                )
            continue
        marks = 0
        if char in PUNCTUATION:
            continue
        if category[0] != "L" and category != "Nd":
            raise BadName(
                f"{_show(char)} in {name!r} is not allowed: names are letters, digits and _ - ."
            )
        script = _script(char)
        if script is not None:
            scripts.setdefault(script, char)
    if len(scripts) > 1:
        mixed = ", ".join(f"{script} {char!r}" for script, char in scripts.items())
        raise BadName(
            f"{name!r} mixes scripts ({mixed}): a name's letters are all of one script, "
            "so that it cannot pass for another"
        )
    return name


def look_alike(name: str) -> str:
    """What ``name`` looks like, for telling a new name from existing ones: case folded,
    Cyrillic and Greek letters that look Latin read as Latin."""
    return unicodedata.normalize("NFKC", name).casefold().translate(LOOK_LATIN)


def _script(char: str) -> str | None:
    """The script of a letter or digit (None for 0-9, which every script uses)."""
    if "0" <= char <= "9":
        return None
    word = unicodedata.name(char, "UNKNOWN").split(" ")[0]
    if word in EAST_ASIAN:
        return "Chinese/Japanese/Korean"
    return word.capitalize()


def _show(char: str) -> str:
    """A character as a message shows it: itself and its code point, or the code point alone."""
    code = f"U+{ord(char):04X}"
    if unicodedata.category(char)[0] in "CZM" or ord(char) in INVISIBLE:
        return code
    return f"{char!r} ({code})"
