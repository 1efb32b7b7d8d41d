"""Word splitters behind each filter's ``words`` setting.

``whitespace`` (Gopher's definition): runs of non-space characters.

``datatrove``: the words datatrove 0.10.1 counts (``split_into_words``: a blank spaCy English tokenizer, then
empty tokens dropped), re-implemented without spaCy, which conflicts with this project's dependencies. The facts
it follows: text is cut at whitespace; from each chunk, leading punctuation, quotes, currency and symbol
characters are split off one at a time, trailing ones likewise (plus ``'s``, units and currency after a number,
and a final period after a lowercase letter, a digit or two capitals); what is left is kept whole when it looks
like a URL, else cut at infixes (an ellipsis; a hyphen, ``:<>=/`` or comma between letters; a period between a
lowercase and an uppercase letter; an operator between digits). English contractions split (``don't`` -> ``do``,
``n't``; ``I'm`` -> ``I``, ``'m``), listed abbreviations keep their period (``e.g.``, ``Mr.``; not ``etc.``),
emoticons and a few symbol pairs (``):``) stay whole. Character
classes are approximated from Unicode categories; tests/data_pipeline/test_filter_fidelity.py measures the
decisions against ones recorded from datatrove itself. Pure ``re`` and stdlib, so the recording script can run
it beside datatrove.
"""
from __future__ import annotations

import functools
import itertools
import re
import sys
import unicodedata

WORD_MODES = ("whitespace", "datatrove")
_WS = re.compile(r"\S+")
# The characters datatrove 0.10.1 counts as ending a line or sentence (its TERMINAL_PUNCTUATION: Unicode sentence
# terminals, no quote marks). spaCy's sentencizer uses a subset of it that differs only in rare scripts.
SENTENCE_TERMINALS = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8"
    "\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048"
    "\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8"
    "\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57"
    "\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047"
    "\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6"
    "\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c"
    "\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0"
    "\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c"
    "\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016e98\U0001bc9f\U0001da88")

# Characters datatrove's Gopher quality filter treats as symbols (a word made only of them is not counted).
DATATROVE_PUNCTUATION = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))) | SENTENCE_TERMINALS
_PUNCT = "… …… , : ; ! ? ¿ ؟ ¡ ( ) [ ] { } < > _ # * & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪".split()
_QUOTES = "' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉 ⟦ ⟧".split()
_CURRENCY = "$ £ € ¥ ฿ US$ C$ A$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₾ ₿".split()
_UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
          "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %").split()
# Exceptions to the affix rules (facts from spaCy's English exceptions): abbreviations and single letters keep
# their period, emoticons stay whole, and contractions split before the clitic, with or without the apostrophe.
_ABBREVIATIONS = (
    "a.m. p.m. e.g. E.g. E.G. i.e. I.e. I.E. vs. v.s. co. Co. Corp. Inc. Ltd. Bros. Messrs. Mr. Mrs. Ms. Dr. Jr. "
    "Prof. Rep. Rev. Sen. Gen. Gov. Adm. St. Mt. Ph.D. D.C. N.C. N.D. N.H. N.J. N.M. N.Y. S.C. Jan. Feb. Mar. Apr. "
    "Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. Ak. Ala. Ariz. Ark. Calif. Colo. Conn. Del. Fla. Ga. Ia. Id. Ill. "
    "Ind. Kan. Kans. Ky. La. Mass. Md. Mich. Minn. Miss. Mo. Mont. Neb. Nebr. Nev. Okla. Ore. Pa. Tenn. Va. Wash. "
    "Wis. ä. ö. ü. 0.0 0.o o.0 o.O o.o O.O O.o V.V v.v").split()
_EMOTICONS = (
    ":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; :( :-( "
    ":(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ :| :-| =| :> :-> :* :-* :() ]= =[ ;_; -_- "
    "-__- ^_^ ^__^ ^___^ (^_^) (*_*) (-_-) (._.) ._. (>_<) >.< <.< >.> @_@ :D :P :p :x :X :o :O :0 :3 :1 <3 XD xD "
    "'' ’’ — C++ and/or w/o").split()
_PRONOUN_CLITICS = {("i", "you", "he", "she", "it", "we", "they", "what", "when", "where", "who", "why", "how",
                     "that", "there", "these", "this", "those"): ("'ll", "'ll've", "'d", "'d've"),
                    ("i", "you", "we", "they"): ("'ve",), ("you", "we", "they"): ("'re",),
                    ("he", "she", "it", "that", "this"): ("'s",),
                    ("what", "when", "where", "who", "why", "how", "there"): ("'s", "'re", "'ve"),
                    ("these", "those"): ("'re", "'ve")}
_NOT_STEMS = "ai are ca could dare did does do had has have is might must need ought sha should was were wo would"
_NOT_VE_STEMS = "ca could did does do had might must need ought sha should wo would"
_VE_STEMS = "could might must should would"
_NO_APOSTROPHE_EXCLUDED = {"ill", "its", "hell", "shell", "shed", "were", "well", "whore"}


def _contractions() -> dict:
    out = {}

    def add(stem, clitics):
        toks = [stem] + re.findall(r"n't|'[a-z]+", clitics)
        for first in {stem, stem.title() if stem != "i" else "I"}:
            for apo in ("'", "\u2019"):
                parts = [first] + [t.replace("'", apo) for t in toks[1:]]
                out["".join(parts)] = tuple(parts)
            bare = [first] + [t.replace("'", "") for t in toks[1:]]
            if "".join(bare).lower() not in _NO_APOSTROPHE_EXCLUDED:
                out["".join(bare)] = tuple(bare)

    for stems, clitics in _PRONOUN_CLITICS.items():
        for stem in stems:
            for c in clitics:
                add(stem, c)
    add("i", "'m")
    for stem in _NOT_STEMS.split():
        add(stem, "n't")
    for stem in _NOT_VE_STEMS.split():
        add(stem, "n't've")
    for stem in _VE_STEMS.split():
        add(stem, "'ve")
    for word, parts in (("cannot", ("can", "not")), ("gonna", ("gon", "na")), ("gotta", ("got", "ta")),
                        ("yall", ("y", "all")), ("y'all", ("y'", "all")), ("let's", ("let", "'s")),
                        ("let’s", ("let", "’s"))):
        out[word] = parts
        out[word.title()] = (parts[0].title(),) + parts[1:]
    for hour in range(1, 13):
        for suffix in ("am", "pm", "a.m.", "p.m."):
            out[f"{hour}{suffix}"] = (str(hour), suffix)
    return out


@functools.lru_cache(maxsize=1)
def _specials() -> dict:
    out = _contractions()
    clitics = ("'s 'S ’s ’S ‘s 'd ’d 'll ’ll 're ’re 'em ’em 'cause 'Cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout "
               "'nuff ' ’").split()
    for s in _ABBREVIATIONS + _EMOTICONS + clitics + [c + "." for c in "abcdefghijklmnopqrstuvwxyz"]:
        out[s] = (s,)
    return out


_DIGITS = frozenset("0123456789")
_PREFIX_CHARS = frozenset("§%=—–…" + "".join(x for x in _PUNCT + _QUOTES + _CURRENCY if len(x) == 1))
_SUFFIX_CHARS = frozenset("…—–" + "".join(x for x in _PUNCT + _QUOTES if len(x) == 1))
_PERIOD_AFTER = frozenset("".join(_PUNCT + _QUOTES) + "|(?:)%²-+")  # (spaCy's class also holds "|(?:)")
_QUOTE_CHARS = frozenset("".join(_QUOTES))
_CURRENCY_PREFIX = ("US$", "C$", "A$")
_AFTER_DIGIT = frozenset(_CURRENCY + _UNITS)  # suffixes split only after a digit
_AFTER_DIGIT_LENGTHS = sorted({len(x) for x in _AFTER_DIGIT}, reverse=True)
_HYPHEN_ORDER = ("-", "–", "—", "--", "---", "——", "~")  # tried in this order, like spaCy's alternation
_INFIX_TRIGGERS = frozenset(".…+-*^,:<>=/~–—")
_URL = re.compile(
    r"(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?"
    r"[A-Za-z0-9\u00a1-\uffff]\.)+(?P<tld>[^\W\d_]{2,63}))(?::\d{2,5})?(?:[/?#]\S*)?")


def _is_url(s: str) -> bool:
    m = _URL.fullmatch(s)  # the top-level domain must be lowercase: "pathlib.Path" is no URL
    return bool(m) and all(map(_lower, m.group("tld") or ""))


def _icon(c: str) -> bool:
    return unicodedata.category(c) == "So"


def _lower(c: str) -> bool:  # spaCy's ALPHA_LOWER: lowercase or uncased letters
    return c.isalpha() and not c.isupper()


def _upper(c: str) -> bool:
    return c.isalpha() and not c.islower()


def _find_prefix(s: str) -> int:
    """Length of the prefix split off the front of ``s`` (0: none)."""
    c = s[0]
    if c.isalnum():
        return next((len(p) for p in _CURRENCY_PREFIX if s.startswith(p)), 0)
    if s.startswith(".."):
        return len(s) - len(s.lstrip("."))
    if c == "+":
        return 0 if s[1:2] in _DIGITS and len(s) > 1 else 1
    return 1 if c in _PREFIX_CHARS or _icon(c) else 0


def _find_suffix(t: str) -> int:
    """Length of the suffix split off the end of ``t``: of all rules matching up to the end, the leftmost."""
    n = len(t)
    if t.endswith(".."):
        return n - len(t.rstrip("."))
    best = 2 if t.endswith(("……", "'s", "'S", "’s", "’S")) else 0
    for k in _AFTER_DIGIT_LENGTHS:
        if k > best and n > k and t[-k - 1] in _DIGITS and t[-k:] in _AFTER_DIGIT:
            best = k
            break
    if best:
        return best
    c = t[-1]
    if c in _SUFFIX_CHARS or _icon(c):
        return 1
    if n > 1 and c == "+" and t[-2] in _DIGITS:
        return 1
    if n > 1 and c == ".":
        b = t[-2]
        if b in _DIGITS or b in _PERIOD_AFTER or _lower(b):
            return 1
        if n > 2 and ((_upper(b) and _upper(t[-3])) or (t[-3] == "°" and b in "FfCcKk")):
            return 1
    return 0


def _infix_spans(s: str) -> list[tuple[int, int]]:
    """Infix matches, scanned left to right without overlap, rules tried in spaCy's order at each position."""
    out, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        end = 0
        if c not in _INFIX_TRIGGERS:
            if _icon(c):
                end = i + 1
        elif c == "." and s[i + 1:i + 2] == ".":
            end = i + (len(s[i:]) - len(s[i:].lstrip(".")))
        elif c == "…":
            end = i + 1
        elif i > 0:
            prev, nxt = s[i - 1], s[i + 1:i + 2]
            if c in "+-*^" and prev in _DIGITS and nxt and (nxt in _DIGITS or nxt == "-"):
                end = i + 1
            elif c == "." and nxt and (_lower(prev) or prev in _QUOTE_CHARS) and (_upper(nxt) or nxt in _QUOTE_CHARS):
                end = i + 1
            elif c == "," and nxt and prev.isalpha() and nxt.isalpha():
                end = i + 1
            elif c in "-–—~" and (prev.isalpha() or prev in _DIGITS):
                for h in _HYPHEN_ORDER:
                    if s.startswith(h, i) and s[i + len(h):i + len(h) + 1].isalpha():
                        end = i + len(h)
                        break
            if not end and c in ":<>=/" and nxt and (prev.isalpha() or prev in _DIGITS) and nxt.isalpha():
                end = i + 1
        if end:
            out.append((i, end))
            i = end
        else:
            i += 1
    return out


def _special(s: str):
    return _specials().get(s)


def _no_special(_s: str):
    return None


def _affix_split(chunk: str, with_specials: bool = True) -> list[str]:
    """One whitespace-free chunk -> tokens, following the affix/infix procedure described above."""
    lookup = _special if with_specials else _no_special
    pre: list[str] = []
    suf: list[str] = []
    s, last = chunk, -1
    while s and len(s) != last:
        if lookup(s):
            break
        last = len(s)
        p = _find_prefix(s)
        if p and lookup(s[p:]):
            pre.append(s[:p])
            s = s[p:]
            break
        q = _find_suffix(s[p:]) if len(s) > p else 0
        if q and lookup(s[:-q]):
            suf.append(s[-q:])
            s = s[:-q]
            break
        if p and q and p + q <= len(s):
            pre.append(s[:p])
            suf.append(s[-q:])
            s = s[p:-q]
        elif p:
            pre.append(s[:p])
            s = s[p:]
        elif q:
            suf.append(s[-q:])
            s = s[:-q]
    mid: list[str] = []
    if s:
        special = lookup(s)
        if special:
            mid = list(special)
        elif not (spans := _infix_spans(s)) or _is_url(s):
            mid = [s]
        else:
            start = 0
            for i, j in spans:
                if i == 0:
                    continue
                if i != start:
                    mid.append(s[start:i])
                mid.append(s[i:j])
                start = j
            if s[start:]:
                mid.append(s[start:])
    return pre + mid + suf[::-1]


@functools.lru_cache(maxsize=1)
def _mergeable() -> tuple[set, set]:
    """Single-token exceptions that the affix rules would cut (``):``, ``''``, ``a.``) and their first pieces."""
    whole = {k for k, v in _specials().items() if v == (k,) and len(_affix_split(k, False)) > 1}
    return whole, {_affix_split(k, False)[0] for k in whole}


def _merge_specials(toks: list[str]) -> list[str]:
    """Adjacent tokens that together spell a single-token exception are merged back into one, longest first."""
    whole, firsts = _mergeable()
    if not any(t in firsts for t in toks):
        return toks
    out, i = [], 0
    while i < len(toks):
        for n in ((4, 3, 2) if toks[i] in firsts else ()):
            if i + n <= len(toks) and "".join(toks[i:i + n]) in whole:
                out.append("".join(toks[i:i + n]))
                i += n
                break
        else:
            out.append(toks[i])
            i += 1
    return out


def _split_chunk(chunk: str) -> tuple[str, ...]:
    special = _special(chunk)
    if special:
        return special
    if chunk.isalpha():  # no affix or infix rule can apply to letters only: the common case, kept cheap
        return (chunk,)
    toks = _affix_split(chunk)
    return tuple(_merge_specials(toks) if len(toks) > 1 else toks)


_CACHED_CHUNK_CHARS = 48  # words repeat; long chunks (URLs, code, base64) rarely do and would fill the cache
_split_short = functools.lru_cache(maxsize=1 << 17)(_split_chunk)


def _split_any(chunk: str) -> tuple[str, ...]:
    return _split_short(chunk) if len(chunk) <= _CACHED_CHUNK_CHARS else _split_chunk(chunk)


def datatrove_words(text: str) -> list[str]:
    # str.split cuts at str.isspace() characters, exactly where spaCy does; map + chain keep the loop in C
    return list(itertools.chain.from_iterable(map(_split_any, text.split())))


def datatrove_sentence_count(line: str) -> int:
    """Sentences spaCy's sentencizer finds in ``line`` (as datatrove's C4 filter counts them): a new sentence
    starts at the first token after a sentence-terminal token that is not itself punctuation."""
    count, seen_end = 0, False
    for tok in datatrove_words(line):
        if count == 0:
            count = 1
        is_end = tok in SENTENCE_TERMINALS
        if seen_end and not is_end and not _is_punct(tok):
            count += 1
            seen_end = False
        elif is_end:
            seen_end = True
    return count


def _is_punct(tok: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") for ch in tok)


def whitespace_words(text: str) -> list[str]:
    return _WS.findall(text)


def splitter(mode: str):
    """The word function for a filter's ``words`` setting."""
    if mode == "whitespace":
        return whitespace_words
    if mode == "datatrove":
        return datatrove_words
    raise ValueError(f"words: {mode!r} is not one of {', '.join(WORD_MODES)}")


if __name__ == "__main__":  # debugging aid: print the words of stdin
    print(datatrove_words(sys.stdin.read()))
