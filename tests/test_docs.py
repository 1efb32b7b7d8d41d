"""Docs stay in sync with the code: every config key of both halves is in the README's reference tables."""
import re

import pytest

from data_pipeline.config import PipelineConfig
from llmforge.config import RunConfig, describe


@pytest.mark.parametrize("cls, heading", [(RunConfig, "### Trainer keys"), (PipelineConfig, "### Data pipeline keys")])
def test_readme_documents_every_key(cls, heading):
    readme = open("README.md").read()
    assert heading in readme
    section = readme.split(heading, 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    keys = {k for k, *_ in describe(cls)}
    assert keys - documented == set(), f"undocumented keys: {sorted(keys - documented)}"
    assert documented - keys == set(), f"README documents keys that do not exist: {sorted(documented - keys)}"
