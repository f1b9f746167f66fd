"""Clean real doctor-patient conversations the way the ChatDoctor paper describes ("filtered to remove physician
and patient names and used language tools to correct grammatical errors"), with every step named, switchable,
counted and sampled in a report.

    python clean.py HealthCareMagic-100k.json data/hcm-clean.json                 # report: data/hcm-clean.report.*
    python clean.py icliniq.jsonl data/icliniq-clean.jsonl --report runs/icliniq.json --no-spelling
    python clean.py IN OUT --rules names,contacts,dedup                           # only these rules
    make clean-data IN=HealthCareMagic-100k.json OUT=data/hcm-clean.json

Input: a JSON array or JSONL of Alpaca-shaped records (`instruction`, `input`, `output`: Alpaca,
HealthCareMagic-100k, the ChatDoctor release of iCliniq) or of the widely used iCliniq copy (`input`,
`answer_icliniq`, `answer_chatgpt`, `answer_chatdoctor`). The output keeps the input's format (array or JSONL,
its indentation and escaping) and every field; records are only changed or dropped. Records are streamed: memory
grows only with the duplicate index (docs/BENCHMARKS.md measures it at 200k records).

The rules, in the order they run (`--no-RULE` switches one off, `--rules a,b` runs only those):
  empty       drop: a question or answer with fewer than --min_words words
  contacts    change: e-mail addresses, phone numbers and URLs -> [EMAIL] / [PHONE] / [URL]
  sites       change: the site's own name in greetings and sign-offs ("Thanks for asking Chat Doctor",
              "Welcome to iCliniq", "I am Chat Doctor") normalised away; other mentions -> "this site"
  chatdoctor  drop: "Chat Doctor" left inside a sentence, the anonymiser's leftover of original issue 58
              ("serum LDH (lactic acid dehy ChatDoctor.")
  names       change: physician and patient names (greetings, sign-offs, "Dr. X", "my name is X", names in the
              text) removed; medical eponyms (Parkinson's disease, Down syndrome, ...) kept
  truncated   drop: an answer or question cut off mid-sentence (ends on a comma or a function word)
  english     drop: non-English text (share of English function words, share of Latin letters)
  spelling    change: a misspelt word fixed only when the hunspell en_US + en_med dictionaries give exactly one
              word at edit distance 1 with the same first letter
  dedup       drop: exact and near duplicates (MinHash LSH over character 16-grams), keeping the first

Every dropped record goes, with its reason, to OUT's `.dropped.jsonl` beside the report. The same input and
flags always give the same output file.
"""
import argparse
import codecs
import functools
import hashlib
import importlib
import json
import os
import re
import string
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from prompts import CHATDOCTOR_INSTRUCTION
from utils import fail

HUNSPELL_DIR = Path(os.environ.get("CLEAN_HUNSPELL_DIR", "/usr/share/hunspell"))
EN_US = "en_US"                     # Debian hunspell-en-us: en_US.dic + en_US.aff
EN_MED = "en_med_glut.dic"          # Debian hunspell-en-med: a plain list of 90k medical words
MISSING_DICTIONARY = ("Debian's hunspell-en-us and hunspell-en-med dictionaries are not installed in {dir} "
                      "(`make dictionaries` installs them, or apt-get install hunspell-en-us hunspell-en-med); "
                      "the names and spelling rules need them: install them or pass --no-names --no-spelling")

# The two record shapes: which fields hold the patient's question and the doctor's answer, and which are text.
SHAPES = {
    "alpaca": {"required": ("instruction", "output"), "question": "input", "answer": "output",
               "text": ("instruction", "input", "output")},
    "icliniq": {"required": ("input", "answer_icliniq"), "question": "input", "answer": "answer_icliniq",
                "text": ("input", "answer_icliniq", "answer_chatgpt", "answer_chatdoctor")},
}
RULES = ("empty", "contacts", "sites", "chatdoctor", "names", "truncated", "english", "spelling", "dedup")

CONSTANT_TEXTS = {CHATDOCTOR_INSTRUCTION}  # HealthCareMagic's and iCliniq's instruction: skipped by the text rules
MIN_WORDS = 3              # fewer words than this in a question or answer: nothing to learn from
DEDUP_THRESHOLD = 0.8      # Jaccard similarity of character 16-gram sets from which two records are one
DEDUP_PERMUTATIONS = 64    # MinHash size: 64 keeps the LSH error small at 0.8 and costs half of 128
EXAMPLES = 5               # examples per rule in the report
NAME_PLACEHOLDER = "[NAME]"

# ----------------------------------------------------------------------------- word lists

# Possessive or plain surnames of diseases that must never be taken for a person's name. The data-derived part
# comes from format_dataset.csv's disease names (eponyms()); this is the short list it lacks.
EPONYMS_EXTRA = {
    "Addison", "Alzheimer", "Asperger", "Baker", "Barr", "Barre", "Bartholin", "Bell", "Bright", "Burkitt",
    "Chiari", "Colles", "Conn", "Crohn", "Cushing", "Dupuytren", "Ehlers", "Danlos", "Epstein", "Ewing", "Fallot",
    "Gilbert", "Graves", "Guillain", "Hashimoto", "Hirschsprung", "Hodgkin", "Horner", "Huntington", "Kaposi",
    "Kawasaki", "Klinefelter", "Legg", "Perthes", "Lou", "Gehrig", "Lyme", "Marfan", "Meniere", "Ménière",
    "Osgood", "Schlatter", "Paget", "Parkinson", "Peyronie", "Raynaud", "Reiter", "Reye", "Sjogren", "Sjögren",
    "Stevens", "Johnson", "Tietze", "Tourette", "Turner", "Wernicke", "Korsakoff", "Whipple", "Wilms", "Wilson",
    "Down", "Apgar", "Babinski", "Pap", "Heimlich", "Holter", "Foley", "Hansen", "Bowen", "Still", "Behcet",
    "Kegel", "Achilles", "Eustachian", "Fallopian", "Montgomery", "Baker's", "Schirmer", "Mantoux", "Widal",
    "Doppler", "Murphy", "Valsalva", "Epley", "Heberden", "Bouchard", "Osler", "Tinel", "Phalen", "Lasegue",
}
DISEASE_WORDS = r"(?:disease|syndrome|palsy|disorder|sign|test|cyst|tumou?r|lymphoma|sarcoma|ulcer|phenomenon|" \
                r"thyroiditis|neuroma|contracture|fracture|neuralgia|arteritis|gland|tube|duct|maneuver|manoeuvre|" \
                r"catheter|monitor|smear|reflex|node|nodes|elbow|knee|foot|toe|finger|score|exercises?|law|solution)"

GREETINGS = r"(?:hi|hello|hey|dear|hii+|hy|good\s+(?:morning|afternoon|evening|day))"
SIGN_OFFS = r"(?:regards|best\s+regards|warm\s+regards|kind\s+regards|with\s+best\s+regards|warmest\s+regards|" \
            r"thanks?(?:\s+(?:you|and\s+regards))?|thank\s+you|" \
            r"take\s+care|best\s+wishes|wishing\s+you\s+(?:good|a\s+speedy)\s+\w+|sincerely|" \
            r"yours\s+(?:truly|sincerely)|" \
            r"cheers|best|god\s+bless)"
TITLES = r"(?:Dr|DR|dr|Doctor|Mr|Mrs|Ms|Miss|Mx|Prof)"
# Words that follow a greeting or a title without being a name.
NOT_NAMES = {
    "i", "im", "my", "me", "we", "you", "your", "the", "a", "an", "and", "or", "but", "so", "please", "pls", "plz",
    "thanks", "thank", "thankyou", "sir", "madam", "mam", "maam", "ma'am", "doctor", "doc", "dr", "dear", "there",
    "all", "everyone", "team", "friend", "friends", "again", "user", "patient", "welcome", "good", "hello", "hi",
    "hey", "is", "am", "are", "can", "could", "what", "how", "why", "when", "where", "which", "who", "if", "as",
    "here", "this", "that", "it", "its", "he", "she", "they", "his", "her", "our", "their", "yes", "no", "ok", "okay",
    "sirs", "doctors", "madame", "mom", "dad", "guys", "buddy", "folks", "chat", "query", "regards", "take", "care",
    "greetings", "morning", "afternoon", "evening", "day", "night", "today", "dear", "respected", "from",
    "for", "to", "in", "on", "at", "of", "with", "by", "after", "before", "since", "kindly", "just", "also", "ji",
    "md", "mbbs", "ms", "dnb", "frcs", "mrcp", "phd", "general", "family", "physician", "consultant",
}
MONTHS_AND_DAYS = {
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Christmas", "Easter",
}
# Function words: the cheap offline language check counts how many words of a text are among them.
ENGLISH_FUNCTION_WORDS = set("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours out over own same she should so some such than that the their them then there these
they this those through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself since also get got i'm i've don't im ive dont it's
""".split())
TRAILING_FUNCTION_WORDS = set("""
a an the and or but of to in on at for with by from as is are was were be been has have had my your his her its our
their this that these those which who whom whose if because so than then very some any no not can could would should
will shall may might must also such into onto about
""".split())

SITE_NAMES = r"(?:Chat\s?Doctor|ChatDoctor|health\s?care\s?magic|HCM|i\s?cliniq|I\s?Cliniq|iclinic)(?:\.com)?"
CHATDOCTOR = re.compile(r"chat\s?doctor", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def person_names():
    """First and last names of Faker's English- and European-script person providers (about 17k): the offline name
    list. Faker is used only for these lists; nothing is generated."""
    names = set()
    for locale in ("en", "en_US", "en_GB", "en_IN", "en_IE", "en_NZ", "en_PK", "en_KE", "en_NG",
                   "fr_FR", "de_DE", "es_ES", "it_IT", "pt_BR"):
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attribute in ("first_names", "first_names_male", "first_names_female", "last_names"):
            values = getattr(provider, attribute, None) or ()
            names.update(v for v in values if v.isalpha() and v[0].isupper())
    return frozenset(names)


EPONYM_IN_NAME = re.compile(r"\b([A-Z][a-z]+)(?:'s|s'|’s)?(?=\s+(?:disease|syndrome|palsy|anomaly|sarcoma|lymphoma|"
                            r"fever|contracture|tumou?r|disorder|neuroma|esophagus|diverticulum|thyroiditis)\b)")


@functools.lru_cache(maxsize=None)
def eponyms(database=Path(__file__).resolve().parent / "format_dataset.csv"):
    """Person names that name a disease in the disease database ("Parkinson disease", "Turner syndrome",
    "Wilson disease"), plus EPONYMS_EXTRA."""
    found = set(EPONYMS_EXTRA)
    if database.is_file():
        import csv
        with open(database, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                for word in EPONYM_IN_NAME.findall(row.get("disease") or ""):
                    if word in person_names():
                        found.add(word)
    return frozenset(found)


class Dictionaries:
    """Debian's hunspell en_US (through spylls, with its affix rules) and en_med (a plain word list)."""

    def __init__(self, folder=HUNSPELL_DIR):
        if not (folder / f"{EN_US}.dic").is_file() or not (folder / EN_MED).is_file():
            raise FileNotFoundError(MISSING_DICTIONARY.format(dir=folder))
        from spylls.hunspell import Dictionary
        self.en_us = Dictionary.from_files(str(folder / EN_US))
        self.medical = frozenset(_read_word_list(folder / EN_MED))
        self.is_word = functools.lru_cache(maxsize=1 << 18)(self._is_word)
        self.is_common_word = functools.lru_cache(maxsize=1 << 18)(self._is_common_word)
        self.correction = functools.lru_cache(maxsize=1 << 18)(self._correction)

    def _is_word(self, word):
        return word.lower() in self.medical or self.en_us.lookup(word)

    def _is_common_word(self, word):
        """A lower-case English word ("will", "hope", "rose"), as opposed to a name the dictionary only knows
        capitalised ("John")."""
        lower = word.lower()
        return self.en_us.lookup(lower) or lower in self.medical

    def _correction(self, word):
        """The one dictionary word at edit distance 1 (Damerau) with the same first letter, or None."""
        if self.is_word(word):
            return None
        found = {c for c in _edits1(word) if c[0] == word[0] and c != word and self.is_word(c)}
        return found.pop() if len(found) == 1 else None


@functools.lru_cache(maxsize=2)
def load_dictionaries(folder):
    """One Dictionaries per folder and process (spylls takes a second or two to read en_US)."""
    return Dictionaries(folder)


def _read_word_list(path):
    words = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line[:1].isspace() or not line.strip() or line.strip().isdigit():
                continue  # the count line and the indented licence header
            words.append(line.strip().split("/", 1)[0].lower())
    return words


def _edits1(word):
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    letters = string.ascii_lowercase
    return {a + b[1:] for a, b in splits if b} | \
        {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1} | \
        {a + c + b[1:] for a, b in splits if b for c in letters} | \
        {a + c + b for a, b in splits for c in letters}


# ----------------------------------------------------------------------------- text rules

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|in|co\.uk|info|io|gov|edu)"
                 r"\b(?:/[^\s<>\"')\]]*)?", re.IGNORECASE)
PHONE = re.compile(r"(?<![\w./])(?<!\d,)(?:\+\d{1,3}[\s-]?)?(?:\(\d{2,5}\)[\s-]?|\d{2,5}[\s-])?\d{3,5}[\s-]?\d{3,5}"
                   r"(?![\w/]|[.,]\d)")

# Cheap literal-led searches that rule a text out before the slower patterns run (most texts have none).
URL_HINT = re.compile(r"\.(?:com|org|net|in|co|info|io|gov|edu)\b|www\.|https?:")
PHONE_HINT = re.compile(r"\d{3}[\s-]?\d{3}")


def _phone_like(match):
    digits = sum(ch.isdigit() for ch in match.group(0))
    return 10 <= digits <= 13 or (match.group(0).startswith("+") and digits >= 8)


def replace_contacts(text):
    """E-mail addresses, URLs and phone numbers -> placeholders; returns (text, Counter of kinds)."""
    counts = Counter()

    def sub(pattern, placeholder, kind, check=None):
        def repl(m):
            if check and not check(m):
                return m.group(0)
            counts[kind] += 1
            found = m.group(0)
            return placeholder + found[len(found.rstrip(".,;:!?")):]  # a sentence's full stop is not the URL's
        return repl

    if "@" in text:
        text = EMAIL.sub(sub(EMAIL, "[EMAIL]", "email"), text)
    if URL_HINT.search(text.lower()):
        text = URL.sub(sub(URL, "[URL]", "url"), text)
    if PHONE_HINT.search(text):
        text = PHONE.sub(sub(PHONE, "[PHONE]", "phone", _phone_like), text)
    return text, counts


class Lowered:
    """A case-blind pattern run, case-sensitively, over the text's lower-case copy: Python's re scans far faster
    for a pattern that starts with a literal than with IGNORECASE or a leading \\b (measured 15x). A match must
    start at a word boundary (checked here, not in the pattern). Texts whose lower-case copy changes length
    (rare non-ASCII letters) fall back to IGNORECASE."""

    def __init__(self, pattern):
        self.fast = re.compile(pattern)
        self.slow = re.compile(pattern, re.IGNORECASE)

    def finditer(self, text, low=None, start=0, end=None):
        low = text.lower() if low is None else low
        pattern, haystack = (self.fast, low) if len(low) == len(text) else (self.slow, text)
        for m in pattern.finditer(haystack, start, len(haystack) if end is None else end):
            if m.start() == 0 or not haystack[m.start() - 1].isalnum():
                yield m

    def sub(self, replace, text, low=None):
        """replace(match, original text) -> str, for each match; the text with the replacements."""
        pieces, last = [], 0
        for m in self.finditer(text, low):
            pieces += [text[last:m.start()], replace(m, text)]
            last = m.end()
        return "".join(pieces) + text[last:] if pieces else text


SITE_NAMES_LOW = r"(?:chat ?doctor|health ?care ?magic|hcm|i ?cliniq|iclinic)(?:\.com)?"
SITE_SUFFIX = r"(?:\s+(?:forum|service|platform|website|site|team))?"
# The site's name where a greeting or a sign-off carries it: (pattern over lower-case text, replacement, kind).
SITE_PHRASES = [
    (Lowered(rf"welcome\s+(?:back\s+)?to\s+(?:the\s+)?['‘“\"]?{SITE_NAMES_LOW}['’”\"]?{SITE_SUFFIX}\s*[.!,]?"), ".",
     "welcome"),
    (Lowered(rf"(asking|using|contacting|choosing|consulting|trusting|writing\s+to|posting\s+(?:on|to|at|in)|"
             rf"reaching\s+out\s+to|visiting)\s+(?:us\s+(?:at|on)\s+)?(?:the\s+)?{SITE_NAMES_LOW}{SITE_SUFFIX}"),
     r"\1 us", "thanks"),
    (Lowered(rf"(?:on|at|to|in|with|through|via)\s+(?:the\s+)?{SITE_NAMES_LOW}{SITE_SUFFIX}(?=\s*[.!,;]|\s*$)"), "",
     "preposition"),
    (Lowered(rf"(?:i\s+am|i'm|this\s+is|myself)\s+(?:dr\.?\s*)?{SITE_NAMES_LOW}\s*[.!,]*"), " ", "introduction"),
    (Lowered(rf"{SITE_NAMES_LOW}\s*[.!]*\s*\Z"), "", "sign-off"),
    (Lowered(rf"{SITE_NAMES_LOW}{SITE_SUFFIX}"), "this site", "mention"),
]
SITE_KEYWORDS = ("chat", "magic", "hcm", "clini")
SIGN_OFF_BEFORE = re.compile(rf"(?:(?<=[.!?,\n])|^)\s*(?:{SIGN_OFFS}\s*[,.]?\s*)?(?:dr\.?\s*)?\Z", re.IGNORECASE)
DR_SITE = re.compile(r"\b[Dd][Rr]\.?\s*this site")


def normalise_sites(text, keep_chatdoctor):
    """The site's name out of greetings and sign-offs; returns (text, Counter of kinds). With keep_chatdoctor,
    a 'Chat Doctor' the phrases do not explain is left in place for the chatdoctor rule to judge."""
    counts = Counter()
    low = text.lower()
    if not any(k in low for k in SITE_KEYWORDS):
        return text, counts
    for pattern, replacement, kind in SITE_PHRASES:
        def replace(m, original, replacement=replacement, kind=kind):
            if kind == "mention" and keep_chatdoctor and CHATDOCTOR.search(m.group(0)):
                return original[m.start():m.end()]
            if kind == "sign-off" and not SIGN_OFF_BEFORE.search(original[max(0, m.start() - 60):m.start()]):
                return original[m.start():m.end()]  # "... on anti-tubercular ChatDoctor.": words replaced (issue 58)
            counts[kind] += 1
            return m.expand(replacement)
        new = pattern.sub(replace, text, low)
        if new is text:
            continue
        text = new
        if kind == "sign-off" and counts[kind]:  # "Regards, Dr. Chat Doctor": the words before it go too
            before = SIGN_OFF_BEFORE.search(text[-60:])
            text = text[:len(text) - 60 + before.start()] if before and len(text) >= 60 else \
                (text[:before.start()] if before else text)
        low = text.lower()
    if counts["mention"]:  # "Dr. Chat Doctor" was a doctor's name the anonymiser replaced
        text = DR_SITE.sub(lambda m: "The doctor" if _sentence_start(m.string, m.start()) else "the doctor", text)
    return (tidy(text) if counts else text), counts


# (pattern, replacement, substrings one of which must be present for the pattern to run: a fast skip)
TIDY = [(re.compile(p), r, needles) for p, r, needles in (
    (r"[ \t]+(?:and[ \t]*)?([,.!?;:])", r"\1", (" ,", " .", " !", " ?", " ;", " :", "\t", " and,", " and.")),
    (r"([,;:])(?:\s*[,;:])+", r"\1", None), (r"[,;:]\s*([.!?])", r"\1", None),
    (r"([.!?])(?:[ \t]*\.)+", r"\1", None), (r"[ \t]{2,}", " ", ("  ", "\t")),
    (r"\n[ \t]*[,.;:][ \t]*", "\n", ("\n",)), (r"[,;:]+[ \t]*\n", "\n", ("\n",)))]


def tidy(text):
    """Spaces and punctuation left behind by a removal: 'Hi , thanks' -> 'Hi, thanks', 'Hello. .' -> 'Hello.'."""
    for pattern, replacement, needles in TIDY:
        if needles is None or any(n in text for n in needles):
            text = pattern.sub(replacement, text)
    return text.strip().lstrip(",.;: ").rstrip(",;: ")


# Where a name may follow: each pattern matches up to the name; NameFinder reads the words after it.
GREETING_AT = Lowered(rf"(?P<greeting>{GREETINGS}\b[ \t]*(?:,[ \t]*(?=(?:dr|doctor|mr|mrs|ms|miss|prof)\b))?)")
SIGN_OFF_AT = Lowered(rf"(?P<sign_off>{SIGN_OFFS}\s*[,.!-]?\s*)")
INTRODUCTION_AT = Lowered(r"(?P<named>(?:my\s+name\s+is|myself|named|called)\s+)|"
                          r"(?P<introduced>(?:i\s+am|i'm|this\s+is)\s+)")
# The same as INTRODUCTION_AT for single spaces, found with str.find (the regex scan was half the names rule).
INTRODUCTIONS = [(p, "named") for p in ("my name is ", "myself ", "named ", "called ")] + \
    [(p, "introduced") for p in ("i am ", "i'm ", "this is ")]


class IntroductionAt:
    """What find() reads of a match: start(), end(), lastgroup."""

    def __init__(self, start, end, kind):
        self._start, self._end, self.lastgroup = start, end, kind

    def start(self):
        return self._start

    def end(self):
        return self._end


# A greeting opens a message (or a line), a sign-off closes it: only these stretches are searched for them.
GREETING_REACH, SIGN_OFF_REACH = 150, 250
TITLE_AT = re.compile(rf"(?P<title>{TITLES})(?![\w.]*@)(?:\.\s*|\s+)")
NAME_TOKEN = re.compile(r"[A-Za-z][A-Za-z'’-]*\.?|\S")
TITLE_TOKEN = re.compile(r"(?:Dr|DR|dr|Mr|Mrs|Ms|Mx|Prof)\.?|Doctor|Miss")
INITIAL = re.compile(r"[A-Z]\.")
CAPITALISED = re.compile(r"[A-Z][a-z]+(?:[-'’][A-Z]?[a-z]+)?\b")
MAX_NAME_WORDS = 4


class NameFinder:
    """Spans of person names in a text, by context: after a greeting, in a sign-off, after a title, after 'my name
    is' / 'I am', a name-list word addressed at the start of a sentence ('David, the pain ...'), and capitalised
    words of the name list inside a sentence. A word of the name list that is also an English word ('Will', 'Hope')
    counts only in a greeting, a sign-off or after a title; an eponym (Parkinson, Down) only after a title."""

    def __init__(self, dictionaries):
        self.words = dictionaries
        self.names = person_names()
        self.eponyms = eponyms()

    def _name_word(self, word, context, closed=False):
        """Is this word part of a name, given the context it stands in ('greeting', 'sign-off', 'title',
        'named' after 'my name is', 'introduced' after 'I am', 'vocative', 'text')? `closed`: punctuation follows
        it ('hi will,' is a name, 'hi will you' is not)."""
        if not word or word in MONTHS_AND_DAYS:
            return False
        listed = word[:1].upper() + word[1:] in self.names
        if word[0].islower():  # "hi john,", "dr smith", "my name is rahul"
            return context in ("greeting", "title", "named") and listed and word not in NOT_NAMES \
                and word not in ENGLISH_FUNCTION_WORDS and (context != "greeting" or closed or
                                                            not self.words.is_common_word(word))
        if word.lower() in NOT_NAMES:
            return False
        if context == "title":
            return listed or word in self.eponyms or not self.words.is_common_word(word)
        if word in self.eponyms:
            return False
        if context in ("greeting", "sign-off", "introduced"):
            return listed or not self.words.is_word(word)
        if context == "named":
            return listed or not self.words.is_common_word(word)
        return listed and not self.words.is_common_word(word)  # 'vocative', 'text'

    def _take(self, text, start, context):
        """The name words from text[start:] on (an optional title first), as a span (start, end), or None."""
        end, words, titled = start, 0, False
        for m in NAME_TOKEN.finditer(text, start, min(len(text), start + 120)):
            if text[end:m.start()].strip():
                break  # something other than spaces between two words
            if "\n" in text[end:m.start()] and words:
                break
            token = m.group(0)
            if words == 0 and not titled and context in ("greeting", "sign-off") and TITLE_TOKEN.fullmatch(token):
                titled, end = True, m.end()
                continue
            word_context = "title" if titled else context
            if INITIAL.fullmatch(token) and word_context in ("title", "sign-off", "named"):
                end, words = m.end(), words + 1
                continue
            word = token.rstrip(".")
            if not word.replace("'", "").replace("’", "").replace("-", "").isalpha() or \
                    not self._name_word(word.removesuffix("'s").removesuffix("’s"), word_context,
                                        closed=text[m.start() + len(word):m.start() + len(word) + 1] in ",.!:;"):
                break
            end, words = m.start() + len(word), words + 1
            if token.endswith(".") or words == MAX_NAME_WORDS:
                break
        return (start, end) if words else None

    def find(self, text):
        """Sorted, non-overlapping (start, end, kind) spans."""
        spans, low = [], text.lower()
        for m in _context_matches(text, low):
            kind = m.lastgroup.replace("_", "-")
            if kind in ("greeting", "sign-off") and not _sentence_start(text, m.start(), kind == "sign-off"):
                continue
            span = self._take(text, m.end(), kind)
            if span:
                spans.append((*span, kind))
        for m in TITLE_AT.finditer(text):
            if m.start() and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "._@"):
                continue
            span = self._take(text, m.end(), "title")
            if span:
                doctor = m.group("title").lower().startswith(("dr", "doc"))
                spans.append((m.start(), span[1], "doctor" if doctor else "title"))
        for m in CAPITALISED.finditer(text):
            word = m.group(0)
            if word not in self.names or (m.start() and text[m.start() - 1].isalnum()) or _eponym_use(text, m.end()):
                continue  # the name list first: most capitalised words are not in it
            if _sentence_start(text, m.start()):
                if text[m.end():m.end() + 1] == "," and self._name_word(word, "vocative"):
                    spans.append((m.start(), m.end(), "text"))
            elif self._name_word(word, "text"):
                spans.append((m.start(), m.end(), "text"))
        return _merge(spans)


def _context_matches(text, low):
    """Greetings in the first GREETING_REACH characters of the text and of each line, sign-offs in the last
    SIGN_OFF_REACH and before each line break, 'my name is' / 'I am' anywhere."""
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"] if "\n" in text else [0]
    for start in starts:
        yield from GREETING_AT.finditer(text, low, start, start + GREETING_REACH)
    ends = ([i for i, ch in enumerate(text) if ch == "\n"] if "\n" in text else []) + [len(text)]
    for end in ends:
        yield from SIGN_OFF_AT.finditer(text, low, max(0, end - SIGN_OFF_REACH), end)
    if len(low) != len(text):  # a non-ASCII letter whose lower case changes length: the case-blind pattern
        yield from INTRODUCTION_AT.finditer(text, low)
        return
    for phrase, kind in INTRODUCTIONS:
        at = low.find(phrase)
        while at >= 0:
            if at == 0 or not low[at - 1].isalnum():
                yield IntroductionAt(at, at + len(phrase), kind)
            at = low.find(phrase, at + 1)


def _sentence_start(text, index, after_comma=False):
    i = index - 1
    while i >= 0 and text[i] in " \t\"'“‘(":
        i -= 1
    return i < 0 or text[i] in (".!?\n:," if after_comma else ".!?\n:")


def _eponym_use(text, end):
    return re.match(rf"(?:'s|s'|’s|')?\s+{DISEASE_WORDS}\b", text[end:end + 40], re.IGNORECASE) is not None


def _merge(spans):
    """Overlapping spans merged; the kind of the earliest-starting kept (greeting / sign-off win over text)."""
    merged = []
    for start, end, kind in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), merged[-1][2])
        else:
            merged.append((start, end, kind))
    return merged


SPECIALIST = re.compile(r"(?i)[a-z]+(?:ist|ian|eon)|doctor|physician|surgeon|consultant|gp|dr\.?")


def redact_names(text, spans, placeholder):
    """Greeting and sign-off names go ('Hi John,' -> 'Hi,'), 'Dr. Smith' in a sentence becomes 'the doctor', any
    other name the placeholder."""
    out, last = [], 0
    for start, end, kind in spans:
        out.append(text[last:start])
        if kind in ("greeting", "sign-off"):
            replacement = ""
        elif kind == "doctor":
            before = text[max(0, start - 30):start].split()
            if before and SPECIALIST.fullmatch(before[-1]):
                replacement = ""  # "her neurologist Dr. Mehta" -> "her neurologist"
            else:
                replacement = "The doctor" if _sentence_start(text, start) else "the doctor"
        else:
            replacement = placeholder
        out.append(replacement)
        last = end
    out.append(text[last:])
    return tidy("".join(out))


LOWER_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
ENGLISH_MIN_SHARE = 0.2
TOKEN = re.compile(r"\b[a-z]{4,}\b")


def correct_spelling(text, dictionaries, protected):
    """Lower-case words of 4+ letters the dictionaries do not know, replaced where exactly one correction exists."""
    changes = []

    def repl(m):
        word = m.group(0)
        if word in protected:
            return word
        fixed = dictionaries.correction(word)
        if fixed:
            changes.append((word, fixed))
            return fixed
        return word
    return TOKEN.sub(repl, text), changes


def is_english(text):
    """A cheap offline check: mostly Latin letters, and at least 20% of the words English function words (a
    patient's question runs at 40-60%; transliterated Hindi or Spanish at under 15%, their few hits being words
    such as 'do', 'me', 'a'). Texts under 6 words pass on letters alone."""
    if not text.isascii():
        letters = [ch for ch in text if ch.isalpha()]
        if letters and sum(ch.isascii() for ch in letters) / len(letters) < 0.9:
            return False
    words = LOWER_WORD.findall(text.lower())
    if len(words) < 6:
        return True
    return sum(map(ENGLISH_FUNCTION_WORDS.__contains__, words)) / len(words) >= ENGLISH_MIN_SHARE


def is_truncated(text):
    """Cut off mid-sentence: ends on a comma, an opening bracket or a hyphen, or on a function word."""
    stripped = text.rstrip()
    if not stripped:
        return False
    if stripped[-1] in ",(-–:;":
        return True
    if stripped[-1] in ".!?)\"'”’…":
        return False
    last = stripped.rsplit(None, 1)[-1].lower()
    return last in TRAILING_FUNCTION_WORDS


def word_count(text):
    return len(text.split())


# Bytes that stay in the normalised text: ASCII letters and digits, and the bytes of non-ASCII letters.
_SPACES = bytes(c if (chr(c).isascii() and chr(c).isalnum() and not chr(c).isupper()) or c >= 128 else 32
                for c in range(256))
SHINGLE = 16        # characters per shingle: about three words
SAMPLE_BITS = 2     # keep the shingles whose mixed hash has its top 2 bits zero: a consistent 1-in-4 sample


def normalised_bytes(text):
    """The text lower-cased, every run of other characters one space, as bytes (translate and split run in C)."""
    return b" ".join(text.lower().encode("utf-8").translate(_SPACES).split())


def shingle_hashes(normalised):
    """Distinct 32-bit hashes of the character 16-grams (each 16-byte window read as two uint64 and mixed), a
    consistent sample of them (a shingle kept in one record is kept in every record, so the sample's Jaccard
    similarity estimates the whole one), sorted."""
    n = len(normalised) - SHINGLE + 1
    if n <= 0:
        return [zlib.crc32(normalised)]
    data = np.frombuffer(normalised, dtype=np.uint8)
    eights = np.lib.stride_tricks.as_strided(data, shape=(n + 8, 8), strides=(1, 1)).copy().view(np.uint64)
    hashes = eights[:n, 0] * np.uint64(0x9E3779B97F4A7C15) + eights[8:, 0] * np.uint64(0xC2B2AE3D27D4EB4F)
    hashes ^= hashes >> np.uint64(29)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes >>= np.uint64(32)
    sampled = hashes[(hashes >> np.uint64(32 - SAMPLE_BITS)) == 0]
    return sorted(set((sampled if len(sampled) else hashes[:1]).tolist()))


# ----------------------------------------------------------------------------- reading and writing

class CleanError(Exception):
    """Bad input: the message names the file, the record and the field."""


class Utf8Reader:
    """A binary file whose bytes are checked as UTF-8 while they stream (ijson reads bytes)."""

    def __init__(self, f, path):
        self.f, self.path, self.offset = f, path, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def read(self, size=-1):
        data = self.f.read(size)
        try:
            self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise CleanError(f"{self.path}: not valid UTF-8 (byte {self.offset + e.start})") from None
        self.offset += len(data)
        return data


def sniff_format(path):
    """('json' | 'jsonl', indent, ensure_ascii) from the file's first 64 KB."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    stripped = head.lstrip()
    if not stripped:
        raise CleanError(f"{path}: file is empty")
    ensure_ascii = b"\\u" in head and head.isascii()
    if stripped[:1] == b"{":
        return "jsonl", None, ensure_ascii
    if stripped[:1] != b"[":
        raise CleanError(f"{path}: not JSON or JSONL (starts with {stripped[:1].decode('latin-1')!r}); expected a "
                         "JSON array of records or one JSON object per line")
    m = re.match(rb"\[\s*?\n([ \t]*)\{\s*?\n([ \t]*)\"", stripped)
    indent = len(m.group(1)) or len(m.group(2)) if m else None
    return "json", indent, ensure_ascii


MAX_DEPTH = 32  # a record is a flat object; deeper nesting is a broken or hostile file


def array_items(ijson, reader, path):
    """The elements of a top-level JSON array, one at a time, built from ijson's prefix-free events: ijson.items
    keeps a dotted prefix per level, which for a 100,000-deep array takes tens of GB before any error."""
    builder, depth = None, 0
    for event, value in ijson.basic_parse(reader, use_float=True):
        if event in ("start_map", "start_array"):
            depth += 1
            if depth > MAX_DEPTH:
                raise CleanError(f"{path}: JSON nested too deeply (over {MAX_DEPTH} levels) near byte "
                                 f"{reader.offset}")
            if depth == 1:
                continue  # the top-level array itself
        elif event in ("end_map", "end_array"):
            depth -= 1
            if depth == 0:
                return
        if builder is None:
            builder = ijson.ObjectBuilder()
        builder.event(event, value)
        if depth == 1:  # an element just ended (an object, an array, or a scalar)
            yield builder.value
            builder = None


def read_records(path, fmt, progress):
    """Yield (index, record) streaming; progress(bytes_read) is called now and then."""
    import ijson
    with open(path, "rb") as raw:
        reader = Utf8Reader(raw, path)
        if fmt == "json":
            try:
                for index, record in enumerate(array_items(ijson, reader, path)):
                    yield index, record
                    if index % 512 == 0:
                        progress(reader.offset)
            except ijson.JSONError as e:
                raise CleanError(f"{path}: not valid JSON near byte {reader.offset} ({str(e).splitlines()[0]})") \
                    from None
        else:
            index = 0
            line_no = 0
            while True:
                line = raw.readline()
                if not line:
                    break
                line_no += 1
                try:
                    text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise CleanError(f"{path}: line {line_no}: not valid UTF-8 (byte {e.start} of the line)") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except RecursionError:
                    raise CleanError(f"{path}: line {line_no}: JSON nested too deeply") from None
                except json.JSONDecodeError as e:
                    hint = " (a single pretty-printed JSON object? expected one record per line)" if line_no == 1 \
                        and text.strip() == "{" else ""
                    raise CleanError(f"{path}: line {line_no}: not valid JSON ({e.msg}){hint}") from None
                yield index, record
                index += 1
                if index % 512 == 0:
                    progress(raw.tell())
        progress(os.path.getsize(path))


def detect_shape(path, index, record):
    if not isinstance(record, dict):
        raise CleanError(f"{path}: record {index}: expected a JSON object, got {type(record).__name__}")
    for name, shape in (("icliniq", SHAPES["icliniq"]), ("alpaca", SHAPES["alpaca"])):
        if "answer_icliniq" in record if name == "icliniq" else all(f in record for f in shape["required"]):
            return name
    raise CleanError(f"{path}: record {index}: unknown shape (fields {sorted(record)[:6]}); expected Alpaca / "
                     "HealthCareMagic ('instruction', 'input', 'output') or iCliniq ('input', 'answer_icliniq')")


def check_record(path, index, record, shape):
    if not isinstance(record, dict):
        raise CleanError(f"{path}: record {index}: expected a JSON object, got {type(record).__name__}")
    for field in SHAPES[shape]["required"]:
        if field not in record:
            raise CleanError(f"{path}: record {index}: missing field '{field}'")
    for field in SHAPES[shape]["text"]:
        if field in record and not isinstance(record[field], str):
            kind = "null" if record[field] is None else type(record[field]).__name__
            raise CleanError(f"{path}: record {index}: field '{field}' must be a string, got {kind}")
        if field in record and not record[field].isascii():
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError:
                raise CleanError(f"{path}: record {index}: field '{field}' holds an invalid \\u escape (lone "
                                 "surrogate)") from None


class AtomicWriter:
    """Records written to a temporary file beside the target, renamed over it only when all went well."""

    def __init__(self, path, fmt, indent, ensure_ascii):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.fmt, self.indent, self.ensure_ascii = fmt, indent, ensure_ascii
        self.f = open(self.tmp, "w", encoding="utf-8")
        self.count = 0
        if fmt == "json":
            self.f.write("[")

    def write(self, record):
        if self.fmt == "jsonl":
            self.f.write(json.dumps(record, ensure_ascii=self.ensure_ascii) + "\n")
        else:
            text = self._indented(record) if self.indent else json.dumps(record, ensure_ascii=self.ensure_ascii)
            self.f.write(("," if self.count else "") + "\n" + text)
        self.count += 1

    def _indented(self, record):
        """json.dumps(record, indent=k), indented once more as a list item: for a flat record built from
        C-encoded values (json's indent path is pure Python, a third of the run's time at 200k records)."""
        pad = " " * self.indent
        if not record or any(isinstance(v, (dict, list)) for v in record.values()):
            text = json.dumps(record, ensure_ascii=self.ensure_ascii, indent=self.indent)
            return "\n".join(pad + line for line in text.split("\n"))
        dump = functools.partial(json.dumps, ensure_ascii=self.ensure_ascii)
        body = ",\n".join(f"{pad}{pad}{dump(k)}: {dump(v)}" for k, v in record.items())
        return f"{pad}{{\n{body}\n{pad}}}"

    def commit(self):
        if self.fmt == "json":
            self.f.write("\n]\n" if self.count else "]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the cleaner

class RuleStats:
    def __init__(self, name):
        self.name, self.dropped, self.changed, self.kinds, self.examples, self.seconds = name, 0, 0, Counter(), [], 0.0

    def example(self, item, limit):
        if len(self.examples) < limit:
            self.examples.append(item)

    def as_dict(self):
        return {"dropped": self.dropped, "changed_records": self.changed, "changes": dict(sorted(self.kinds.items())),
                "seconds": round(self.seconds, 3), "examples": self.examples}


def snippet(text, start=0, end=None, width=70):
    end = len(text) if end is None else end
    lo, hi = max(0, start - width), min(len(text), end + width)
    return ("…" if lo else "") + text[lo:hi] + ("…" if hi < len(text) else "")


def changed_part(before, after, width=50):
    """The stretch of two texts that differs, with `width` characters of context: what an example shows."""
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    return (snippet(before, start, len(before) - end, width), snippet(after, start, len(after) - end, width))


class Cleaner:
    def __init__(self, rules, min_words=MIN_WORDS, dedup_threshold=DEDUP_THRESHOLD, placeholder=NAME_PLACEHOLDER,
                 examples=EXAMPLES):
        self.rules = [r for r in RULES if r in rules]
        self.min_words, self.placeholder, self.limit = min_words, placeholder, examples
        self.stats = {r: RuleStats(r) for r in self.rules}
        self.dictionaries = load_dictionaries(HUNSPELL_DIR) if {"names", "spelling"} & set(self.rules) else None
        self.finder = NameFinder(self.dictionaries) if "names" in self.rules else None
        self.lower_case_names = frozenset(n.lower() for n in person_names())  # "sunita" is not a misspelling
        if "dedup" in self.rules:
            from datasketch import MinHashLSH
            from datasketch import MinHash
            self.lsh = MinHashLSH(threshold=dedup_threshold, num_perm=DEDUP_PERMUTATIONS)
            self.minhash = MinHash(num_perm=DEDUP_PERMUTATIONS, seed=1, hashfunc=int)  # items are hashed already
            self.seen = set()

    def clean(self, index, record, shape):
        """(cleaned record, None) or (None, (rule, detail)) for a dropped one."""
        fields = [f for f in SHAPES[shape]["text"] if isinstance(record.get(f), str)]
        texts = {f: record[f] for f in fields}
        for rule in self.rules:
            stats = self.stats[rule]
            start = time.perf_counter()  # not process_time: that is a system call costing ~100 us on these VMs
            verdict = getattr(self, f"rule_{rule}")(index, texts, shape, stats)
            stats.seconds += time.perf_counter() - start
            if verdict:
                stats.dropped += 1
                stats.example({"record": index, "detail": verdict}, self.limit)
                return None, (rule, verdict)
        out = dict(record)
        out.update(texts)
        return out, None

    def _question_answer(self, texts, shape):
        question = texts.get(SHAPES[shape]["question"], "")
        if shape == "alpaca" and not question.strip() and texts["instruction"].strip() != CHATDOCTOR_INSTRUCTION:
            question = texts["instruction"]  # a general Alpaca record: the instruction is the question
        return question, texts[SHAPES[shape]["answer"]]

    def _change_each(self, index, texts, stats, change):
        """Apply change(text) -> (new_text, Counter) to every text field; count and sample."""
        changed = False
        for field, text in texts.items():
            if text in CONSTANT_TEXTS:
                continue  # the dataset's fixed instruction: nothing to clean, 200k times over
            new, counts = change(text)
            if new != text:
                changed = True
                stats.kinds.update(counts)
                if len(stats.examples) < self.limit:
                    before, after = changed_part(text, new)
                    stats.example({"record": index, "field": field, "before": before, "after": after}, self.limit)
                texts[field] = new
        stats.changed += changed

    def rule_empty(self, index, texts, shape, stats):
        question, answer = self._question_answer(texts, shape)
        for what, text in (("question", question), ("answer", answer)):
            if word_count(text) < self.min_words:
                return f"{what} has {word_count(text)} words: {text[:80]!r}"

    def rule_contacts(self, index, texts, shape, stats):
        self._change_each(index, texts, stats, replace_contacts)

    def rule_sites(self, index, texts, shape, stats):
        keep = "chatdoctor" in self.rules
        self._change_each(index, texts, stats, lambda t: normalise_sites(t, keep))

    def rule_chatdoctor(self, index, texts, shape, stats):
        for field, text in texts.items():
            m = CHATDOCTOR.search(text)
            if m:
                return f"'{m.group(0)}' inside {field}: {snippet(text, m.start(), m.end(), 60)!r}"

    def rule_names(self, index, texts, shape, stats):
        def change(text):
            spans = self.finder.find(text)
            return (redact_names(text, spans, self.placeholder), Counter(k for _, _, k in spans)) if spans \
                else (text, Counter())
        self._change_each(index, texts, stats, change)

    def rule_truncated(self, index, texts, shape, stats):
        question, answer = self._question_answer(texts, shape)
        for what, text in (("answer", answer), ("question", question)):
            if is_truncated(text):
                return f"{what} ends {text.rstrip()[-60:]!r}"

    def rule_english(self, index, texts, shape, stats):
        question, answer = self._question_answer(texts, shape)
        for what, text in (("question", question), ("answer", answer)):
            if not is_english(text):
                return f"{what} is not English: {text[:80]!r}"

    def rule_spelling(self, index, texts, shape, stats):
        def change(text):
            new, changes = correct_spelling(text, self.dictionaries, self.lower_case_names)
            return new, Counter(f"{a} -> {b}" for a, b in changes)
        self._change_each(index, texts, stats, change)
        if len(stats.kinds) > 4096:  # keep the per-word tally bounded: the most common corrections survive
            stats.kinds = Counter(dict(stats.kinds.most_common(2048)))

    def rule_dedup(self, index, texts, shape, stats):
        question, answer = self._question_answer(texts, shape)
        normalised = normalised_bytes(question + " \n " + answer)
        key = hashlib.blake2b(normalised, digest_size=8).digest()
        if key in self.seen:
            stats.kinds["exact"] += 1
            return "exact duplicate of an earlier record"
        self.seen.add(key)
        minhash = self.minhash
        minhash.clear()
        minhash.update_batch(shingle_hashes(normalised))
        match = self.lsh.query(minhash)
        if match:
            stats.kinds["near"] += 1
            return f"near duplicate of record {min(match)}"
        self.lsh.insert(index, minhash, check_duplication=False)

    def report(self):
        return {rule: s.as_dict() for rule, s in self.stats.items()}


# ----------------------------------------------------------------------------- reports

def summary_text(report):
    lines = [f"clean.py {report['input']} -> {report['output']} ({report['format']}, {report['shape']} shape)",
             f"records read {report['read']:,}, written {report['written']:,}, dropped {report['dropped']:,} "
             f"in {report['seconds']:.1f} s ({report['records_per_second']:,.0f} records/s)", ""]
    lines.append(f"{'rule':<11} {'dropped':>8} {'changed':>8}  changes")
    for rule, s in report["rules"].items():
        changes = ", ".join(f"{k} {v:,}" for k, v in list(s["changes"].items())[:6])
        lines.append(f"{rule:<11} {s['dropped']:>8,} {s['changed_records']:>8,}  {changes}")
    for rule, s in report["rules"].items():
        if s["examples"]:
            lines.append(f"\n{rule}: examples")
            for e in s["examples"][:3]:
                lines.append(f"  record {e['record']}: " + (e["detail"] if "detail" in e else
                                                             f"{e['before']!r}\n    -> {e['after']!r}"))
    return "\n".join(lines)


def write_chart(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rules = list(report["rules"])
    dropped = [report["rules"][r]["dropped"] for r in rules]
    changed = [report["rules"][r]["changed_records"] for r in rules]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rules) + 1.2))
    y = range(len(rules))
    ax.barh([i - 0.2 for i in y], dropped, height=0.4, label="records dropped", color="#c0392b")
    ax.barh([i + 0.2 for i in y], changed, height=0.4, label="records changed", color="#2980b9")
    ax.set_yticks(list(y), rules)
    ax.invert_yaxis()
    ax.set_xlabel("records")
    ax.set_title(f"clean.py: {report['read']:,} read, {report['written']:,} written", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def clean_file(in_path, out_path, cleaner, report_path=None, dropped_path=None, show_progress=True):
    from tqdm import tqdm
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise CleanError(f"{in_path}: file not found")
    if in_path.is_dir():
        raise CleanError(f"{in_path}: is a directory, expected a data file")
    if out_path.is_dir():
        raise CleanError(f"{out_path}: is a directory, expected the output file's path")
    if in_path.resolve() == out_path.resolve():
        raise CleanError(f"{out_path}: the output would overwrite the input")
    fmt, indent, ensure_ascii = sniff_format(in_path)
    report_path = Path(report_path) if report_path else out_path.with_name(out_path.stem + ".report.json")
    dropped_path = Path(dropped_path) if dropped_path else report_path.with_name(
        report_path.name.replace(".report.json", "").replace(".json", "") + ".dropped.jsonl")
    writer = AtomicWriter(out_path, fmt, indent, ensure_ascii)
    dropped = AtomicWriter(dropped_path, "jsonl", None, False)
    bar = tqdm(total=os.path.getsize(in_path), unit="B", unit_scale=True, desc="clean", mininterval=1.0,
               disable=not (show_progress and sys.stderr.isatty()))  # a log file gets the summary, not a bar
    start, cpu_start, shape, read, reasons = time.perf_counter(), time.process_time(), None, 0, Counter()
    try:
        for index, record in read_records(in_path, fmt, lambda offset: bar.update(offset - bar.n)):
            shape = shape or detect_shape(in_path, index, record)
            check_record(in_path, index, record, shape)
            read += 1
            cleaned, verdict = cleaner.clean(index, record, shape)
            if cleaned is not None:
                writer.write(cleaned)
            else:
                reasons[verdict[0]] += 1
                dropped.write({"record": index, "reason": verdict[0], "detail": verdict[1], "original": record})
        if read == 0:
            raise CleanError(f"{in_path}: no records (empty list)")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        report = {
            "input": str(in_path), "output": str(out_path), "format": fmt, "shape": shape, "read": read,
            "written": writer.count, "dropped": read - writer.count, "dropped_by_reason": dict(reasons),
            "rules_run": cleaner.rules, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "records_per_second": round(read / seconds, 1) if seconds else None,
            "records_per_cpu_second": round(read / cpu_seconds, 1) if cpu_seconds else None,
            "dropped_file": str(dropped_path), "rules": cleaner.report(),
        }
        writer.commit()
        dropped.commit()
    except BaseException:
        writer.abort()
        dropped.abort()
        bar.leave = False  # the error line stands alone
        raise
    finally:
        bar.close()
    from utils import write_atomic, write_json_atomic
    write_json_atomic(report_path, report)
    text = summary_text(report)
    write_atomic(report_path.with_suffix(".md"), "```\n" + text + "\n```\n")
    write_chart(report, report_path.with_suffix(".png"))
    return report, text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="JSON array or JSONL: Alpaca / HealthCareMagic / iCliniq records")
    parser.add_argument("output", help="the cleaned file, in the input's format")
    parser.add_argument("--report", help="report JSON (a .md summary and a .png chart beside it); default: "
                                         "OUT's name with .report.json")
    parser.add_argument("--dropped", help="JSONL of every dropped record with its reason; default beside the report")
    parser.add_argument("--rules", help=f"comma-separated rules to run (default all: {','.join(RULES)})")
    for rule in RULES:
        parser.add_argument(f"--no-{rule}", dest=f"no_{rule}", action="store_true", help=f"skip the {rule} rule")
    parser.add_argument("--min_words", type=int, default=MIN_WORDS, help="empty: fewest words a question or answer "
                                                                          "may have")
    parser.add_argument("--dedup_threshold", type=float, default=DEDUP_THRESHOLD,
                        help="dedup: Jaccard similarity of character 16-grams from which two records are one")
    parser.add_argument("--name_placeholder", default=NAME_PLACEHOLDER,
                        help="names: what a name inside a sentence becomes (greeting and sign-off names are removed)")
    parser.add_argument("--examples", type=int, default=EXAMPLES, help="examples per rule in the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    chosen = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else list(RULES)
    unknown = [r for r in chosen if r not in RULES]
    if unknown:
        parser.error(f"unknown rule(s) {', '.join(unknown)}; the rules are {', '.join(RULES)}")
    args.rules = [r for r in chosen if not getattr(args, f"no_{r}")]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        cleaner = Cleaner(args.rules, min_words=args.min_words, dedup_threshold=args.dedup_threshold,
                          placeholder=args.name_placeholder, examples=args.examples)
        report, text = clean_file(args.input, args.output, cleaner, args.report, args.dropped,
                                  show_progress=not args.quiet)
    except (CleanError, FileNotFoundError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: nothing written", code=130)
    if not args.quiet:
        print(text)
    return report


if __name__ == "__main__":
    main()
