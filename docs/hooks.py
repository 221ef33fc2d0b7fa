"""The documentation site's build hooks (mkdocs.yml names this file twice).

- MkDocs hook: the site's home page is README.md, the repository's front page, generated at build time. One source
  for both: the README's links are written for the repository (``docs/protocol.md``, ``LICENSE``), so on the site a
  link into ``docs/`` loses that prefix and a link to another file of the repository, which the site does not hold,
  becomes the file's path in code. ``mkdocs serve`` rebuilds when the README changes.
- Griffe extension ``SphinxRoles`` for the API reference: the docstrings are written for ``help()`` and use Sphinx
  roles (``:class:`~lowshot.config.ProbeSettings```) and ``::`` before a literal block; Markdown shows them as code
  (``ProbeSettings``, the ``~`` keeping the last name only) and a plain colon.
"""

from __future__ import annotations

import re
from pathlib import Path

from griffe import Extension
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[1] / "README.md"
ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)
LINK = re.compile(r"\[([^\]]+)\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def site_markdown(readme: str) -> str:
    """The README with its repository links rewritten for a page at the root of the site."""

    def relink(match: re.Match[str]) -> str:
        text, target = match.groups()
        if target.startswith("docs/"):
            return f"[{text}]({target.removeprefix('docs/')})"
        path = f"`{target}`"
        return path if text.strip("`") == target else f"{text} ({path})"

    return LINK.sub(relink, readme)


def on_files(files, config):
    if files.get_file_from_path("index.md") is not None:
        raise PluginError("docs/index.md exists: the home page is generated from README.md, remove that file")
    files.append(File.generated(config, "index.md", content=site_markdown(README.read_text(encoding="utf-8"))))
    return files


def on_serve(server, config, builder):
    server.watch(str(README))
    return server


def markdown_docstring(text: str) -> str:
    """A docstring's Sphinx roles as code spans and its ``::`` literal-block markers as a colon."""
    text = ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return LITERAL_BLOCK.sub(":", text)


class SphinxRoles(Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
