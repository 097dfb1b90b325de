"""The documentation keeps up with the code: every config key in mjctl.toml, every command in the README."""

from __future__ import annotations

import re
from pathlib import Path

from mjctl.config import SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_key_with_its_default():
    text = (ROOT / "mjctl.toml").read_text()
    section = None
    documented = {}
    for line in text.splitlines():
        head = re.match(r"^\[(\w+)\]$", line)
        if head:
            section = head.group(1)
            continue
        entry = re.match(r"^# (\w+) = (.+?)(\s+# .*)?$", line)
        if entry and section:
            documented[(section, entry.group(1))] = entry.group(2)
    for section, keys in SCHEMA.items():
        for key, (default, _typ, _help) in keys.items():
            assert (section, key) in documented, f"[{section}] {key} is not in mjctl.toml"
            value = documented[(section, key)]
            expected = ("true" if default else "false") if isinstance(default, bool) else (
                f'"{default}"' if isinstance(default, str) else repr(default))
            assert value == expected, f"[{section}] {key}: mjctl.toml says {value}, the default is {expected}"


def test_readme_mentions_every_command():
    from typer.main import get_command

    from mjctl.cli import app

    readme = (ROOT / "README.md").read_text()
    root = get_command(app)
    missing = []
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        if subs:
            missing += [f"mjctl {name} {sub}" for sub in subs if f"mjctl {name} {sub}" not in readme]
        elif f"mjctl {name}" not in readme:
            missing.append(f"mjctl {name}")
    assert not missing, f"README.md does not mention: {missing}"


def test_readme_quick_start_is_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && mjctl demo" in readme
    assert "pip install -e '.[test]' && pytest" in readme


def test_api_doc_is_generated_from_the_current_openapi_document():
    """docs/api.md is what mjctl.server.apidoc renders from the app's OpenAPI document today."""
    import difflib

    import pytest

    from mjctl.server.apidoc import build_spec, render_markdown

    path = Path(__file__).resolve().parent.parent / "docs" / "api.md"
    expected = render_markdown(build_spec())
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/api.md", "generated"))[:60])
        pytest.fail(f"docs/api.md is out of date: run python -m mjctl.server.apidoc > docs/api.md\n{diff}",
                    pytrace=False)
