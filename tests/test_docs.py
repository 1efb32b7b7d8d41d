"""Docs stay in sync with the code: every config key of both halves (and of a scaling sweep's section) is in the
README's reference tables, with the default, range and description the dataclasses carry (regenerate with
`make readme-keys`)."""
import re

import pytest

from data_pipeline.config import PipelineConfig
from llmforge.core.config import RunConfig, describe, markdown_keys
from llmforge.scaling.sweep import SweepConfig

TABLES = [(RunConfig, "### Trainer keys"), (PipelineConfig, "### Data pipeline keys"),
          (SweepConfig, "### Scaling sweep keys")]  # every numeric key's range is documented in the README


@pytest.mark.parametrize("cls, heading", TABLES)
def test_readme_documents_every_key(cls, heading):
    readme = open("README.md").read()
    assert heading in readme
    section = readme.split(heading, 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    keys = {k for k, *_ in describe(cls)}
    assert keys - documented == set(), f"undocumented keys: {sorted(keys - documented)}"
    assert documented - keys == set(), f"README documents keys that do not exist: {sorted(documented - keys)}"


@pytest.mark.parametrize("cls, heading", TABLES)
def test_readme_rows_match_defaults_and_descriptions(cls, heading):
    section = open("README.md").read().split(heading, 1)[1].split("\n### ", 1)[0]
    rows = {ln for ln in section.splitlines() if ln.startswith("| `")}
    expected = {ln for ln in markdown_keys(cls).splitlines() if ln.startswith("| `")}
    assert rows == expected, f"stale rows (run `make readme-keys`): {sorted(rows ^ expected)[:4]}"
