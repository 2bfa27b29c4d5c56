"""Caption quality scores: BLEU-1..4, ROUGE-L and CIDEr, computed with the COCO caption evaluation code (pycocoevalcap).

    from vlcap.caption_metrics import score_captions, tokenizer_for
    captions, references = {"img1": "a dog on a couch"}, {"img1": ["A dog lies on a sofa.", "A brown dog on a couch."]}
    scores = score_captions(captions, references)
    print(tokenizer_for(captions, references), scores)  # ptb {'BLEU-1': ..., 'BLEU-4': ..., 'ROUGE-L': ..., 'CIDEr': ...}
    scores, cider = score_captions(captions, references, per_image=True)  # cider: {"img1": CIDEr of its caption}

Why pycocoevalcap: it is the packaged copy of the COCO caption evaluation code (github.com/tylin/coco-caption) behind the
numbers captioning papers report, so scores here compare with published ones. Its `Cider` class is CIDEr-D, the variant the
COCO evaluation server reports (read in pycocoevalcap/cider/cider_scorer.py): document frequencies come from the reference
captions only; each candidate n-gram weight is clipped to the reference's, min(g_cand, g_ref) * g_ref; each cosine is
multiplied by a Gaussian length penalty exp(-(len_cand - len_ref)^2 / (2 * 6^2)); the scores of n = 1..4 are averaged, then
averaged over the references and multiplied by 10. BLEU and ROUGE-L are in [0, 1]; CIDEr-D runs from 0 to 10.
CIDEr-D depends on the set of images scored (its idf is computed over their references): compare CIDEr only over the same
images, and note that over a single image every weight is log(1) - log(1) = 0, so CIDEr is 0 whatever the caption.
METEOR and SPICE are not computed: both need Java plus large extra jars and models (SPICE downloads Stanford CoreNLP models).

Tokenization: the official scores tokenize every caption with Stanford CoreNLP's PTBTokenizer (Java), lowercase it and drop the
punctuation tokens in pycocoevalcap's PUNCTUATIONS list. tokenizer="auto" uses that tokenizer when Java and the jar are
present, and otherwise a pure-Python imitation ("simple"): lowercase, PTB-style splitting of contractions (is n't, man 's),
brackets written as PTB does (-lrb-), and the same punctuation removed. It differs from the official one in edge cases the
imitation does not model (rock 'n' roll, 10:30am -> 10:30 am, abbreviations it does not know), so scores can differ
slightly. Measured: 184 COCO val2014 captions (cocoapi's captions_val2014_fakecap_results.json), each scored against its four
neighbours' captions, got the same tokens from both tokenizers and identical scores; with 24 harder captions added
(contractions, quotes, brackets, $, %, abbreviations; one of them, "10:30am", tokenized differently) the fallback's scores
moved by +1.9e-4 BLEU-1, +2.1e-5 BLEU-4, +4.3e-5 ROUGE-L and +2.2e-6 CIDEr. The official path is about 0.3 s per call
(one JVM start), and gives the same numbers as pycocoevalcap's own COCOEvalCap tokenize-then-score sequence.
Chinese: tokenizer="auto" takes "jieba" when any caption or reference holds a Chinese character. Each run of Chinese
characters is cut into words by the jieba segmenter (its default, precise mode), the way the published Chinese captioning
evaluations tokenize (AI Challenger 2017's caption evaluation code and COCO-CN's both cut with jieba before pycocoevalcap
scores), so scores compare with theirs; everything between those runs (English words, digits) goes through the "simple"
tokenizer above, so mixed captions score as both languages would, and an English caption gets exactly its "simple"
tokens. Fullwidth forms are folded (NFKC) and Chinese punctuation (，。、！？“” ...) is dropped as PTB's is.
Character-level scoring, the other common choice, makes every Chinese character a "word": BLEU-4 then counts 4-character
runs (about two words), and the numbers cannot be set beside those of AI Challenger or COCO-CN.
Record tokenizer_for(captions, references) with the scores so numbers from different machines stay comparable.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

PTB_JAR = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
PUNCTUATION = set(ptbtokenizer.PUNCTUATIONS)
TOKENIZERS = ("auto", "ptb", "simple", "jieba")
CHINESE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]+")
# Chinese punctuation NFKC leaves as it is (the fullwidth ，！？：；（） become ASCII, and curly quotes are simple_tokenize's).
CHINESE_PUNCTUATION = re.compile(r"[\u3000-\u303f\u2026\u2014\u2013\u00b7\ufe10-\ufe4f]")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


@functools.cache
def java_available() -> bool:
    """Whether the official tokenizer can run: the jar is installed and `java` starts (macOS ships a stub that only errors)."""
    if shutil.which("java") is None or not PTB_JAR.is_file():
        return False
    try:
        return subprocess.run(["java", "-version"], check=False, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def has_chinese(texts) -> bool:
    return any(CHINESE.search(text) for text in ([texts] if isinstance(texts, str) else texts))


def tokenizer_used(tokenizer: str = "auto", texts=()) -> str:
    """The tokenizer score_captions runs for this setting on these texts: "jieba" (Chinese in any of them), "ptb"
    (official, needs Java) or "simple" (pure Python)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {tokenizer!r}.")
    if tokenizer == "ptb" and not java_available():
        raise RuntimeError(
            f"tokenizer='ptb' needs Java and {PTB_JAR}; install a Java runtime or pass tokenizer='simple'."
        )
    if tokenizer == "auto":
        return "jieba" if has_chinese(texts) else "ptb" if java_available() else "simple"
    return tokenizer


def tokenizer_for(captions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto") -> str:
    """The tokenizer score_captions(captions, references, tokenizer) runs: record it beside the scores."""
    return tokenizer_used(tokenizer, [*captions.values(), *(r for k in captions for r in references.get(k, []))])


@functools.cache
def _jieba():
    """jieba's default segmenter, its dictionary loaded once, quietly (it logs every load to stderr)."""
    try:
        import jieba
    except ImportError:
        raise RuntimeError("Chinese captions are scored with jieba's words: pip install jieba.") from None
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def jieba_tokenize(text: str) -> str:
    """One caption as space-separated tokens: runs of Chinese characters cut into words by jieba, the rest (English words,
    numbers) tokenized as simple_tokenize does; punctuation of both languages dropped."""
    text = CHINESE_PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", " ".join(text.splitlines())))
    tokens, at = [], 0
    for run in CHINESE.finditer(text):
        tokens += simple_tokenize(text[at : run.start()]).split()
        tokens += [w for w in _jieba().lcut(run.group(), cut_all=False) if w.strip()]
        at = run.end()
    tokens += simple_tokenize(text[at:]).split()
    return " ".join(tokens)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Tokenize as pycocoevalcap's PTBTokenizer does (same jar, flags and punctuation list), in one Java call.

    Its own tokenize() writes the input file beside the jar, which fails where site-packages is read-only, and lets Java's
    chatter through to stderr; here the file goes to the system temp folder and stderr is captured.
    """
    # Java also breaks lines at \\r, \\v, \\u2028 ...; joining str.splitlines() keeps one output line per caption.
    lines = "\n".join(" ".join(text.splitlines()) for text in texts)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as file:
        file.write(lines.encode())
    try:
        command = ["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        done = subprocess.run([*command, file.name], check=False, capture_output=True)
    finally:
        os.remove(file.name)
    if done.returncode != 0:
        raise RuntimeError(f"The PTB tokenizer (Java) failed: {done.stderr.decode(errors='replace').strip()}")
    out = done.stdout.decode().split("\n")[: len(texts)]
    if len(out) != len(texts):
        raise RuntimeError(f"The PTB tokenizer returned {len(out)} lines for {len(texts)} captions.")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION) for line in out]


# PTBTokenizer normalises curly quotes before splitting; -lowerCase then turns its bracket codes into -lrb- and friends, which
# is why pycocoevalcap's upper-case "-LRB-" entries never match and brackets survive as tokens in the official scores.
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "`": "'"})
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
CONTRACTIONS = {"n't", "'s", "'re", "'ll", "'d", "'ve", "'m"}
# Words PTBTokenizer keeps a final period on; dotted forms (u.s., p.m., e.g.) are recognised by pattern instead.
ABBREVIATIONS = {
    "mr.",
    "mrs.",
    "ms.",
    "dr.",
    "st.",
    "jr.",
    "sr.",
    "ft.",
    "mt.",
    "vs.",
    "etc.",
    "inc.",
    "ltd.",
    "co.",
    "corp.",
}


def simple_tokenize(text: str) -> str:
    """A pure-Python stand-in for ptb_tokenize on one caption, for machines without Java."""
    text = " ".join(text.splitlines()).lower().translate(QUOTES)
    text = re.sub(r"[()\[\]{}]", lambda m: f" {BRACKETS[m[0]]} ", text)
    text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)|[;!?\"]|--|\.{2,}", " ", text)  # 1,000 and 10:30 stay whole, as in PTB
    text = re.sub(r"[$#%]", r" \g<0> ", text)
    text = re.sub(r"(\w)(n't|'s|'re|'ll|'d|'ve|'m)\b", r"\1 \2", text)
    tokens = []
    for token in " ".join(SPLIT_WORDS.get(t, t) for t in text.split()).split():
        if token.endswith(".") and token not in ABBREVIATIONS and not re.fullmatch(r"(\w\.){2,}", token):
            token = token.rstrip(".")
        if token not in CONTRACTIONS:
            token = token.strip("'")  # quotes around words ('stop', dogs') are punctuation
        if token and token.strip("-"):
            tokens.append(token)
    return " ".join(tokens)


def mean_words(captions: dict[str, str] | list[str]) -> float:
    """Mean caption length in words (0.0 for no captions): whitespace-separated, or jieba's words for Chinese."""
    texts = list(captions.values()) if isinstance(captions, dict) else list(captions)
    words = [len(jieba_tokenize(t).split()) if has_chinese(t) else len(t.split()) for t in texts]
    return sum(words) / len(texts) if texts else 0.0


def score_captions(
    captions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto", per_image: bool = False
):
    """BLEU-1..4, ROUGE-L and CIDEr(-D) of one caption per image against that image's reference captions.

    captions maps an image key to the generated caption; references maps image keys (a superset) to reference captions.
    tokenizer: "auto" ("jieba" for Chinese text, else the official PTB tokenizer when Java is present, else "simple"),
    "ptb", "simple" or "jieba".
    Returns {metric: score}; with per_image=True, (that dict, {image key: CIDEr of its caption}). Each image's CIDEr is
    computed over the whole set (CIDEr's idf comes from all the images' references), so the values average to the
    corpus CIDEr; they rank the pictures of this set and mean nothing alone (see the module docstring).
    """
    if not captions:
        raise ValueError("No captions to score: pass at least one caption.")
    missing = [k for k in captions if not references.get(k)]
    if missing:
        raise ValueError(
            f"{len(missing)} captioned images have no reference captions (first: {missing[0]!r}); "
            "pass references for every key of captions."
        )
    if any(isinstance(references[k], str) for k in captions):
        raise ValueError("references must map each image to a list of reference captions, not to one string.")
    keys = list(captions)
    texts = [captions[k] for k in keys] + [r for k in keys for r in references[k]]
    used = tokenizer_used(tokenizer, texts)
    if used == "ptb":
        tokens = ptb_tokenize(texts)
    else:
        tokens = [(jieba_tokenize if used == "jieba" else simple_tokenize)(t) for t in texts]
    res = {k: [tokens[i]] for i, k in enumerate(keys)}
    gts, at = {}, len(keys)
    for k in keys:
        gts[k], at = tokens[at : at + len(references[k])], at + len(references[k])
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, cider_each = Cider().compute_score(gts, res)  # cider_each follows gts' key order: keys
    scores = dict(zip(METRICS, [float(b) for b in bleu] + [float(rouge), float(cider)]))
    return (scores, dict(zip(keys, map(float, cider_each)))) if per_image else scores
