"""Sphinx extension for the cxrcore book: numbered glued tables and launch buttons that open repository files.

- ``{glue:table} <key>``: pastes a table glued by :func:`cxrcore.report.publish_table`
  as a real table node, with the directive's content as its caption, so Sphinx numbers
  it ("Table 3") and ``{numref}`<key>``` refers to it; ``:name:`` defaults to the key.
  MyST-NB's own ``{glue:figure}`` would caption a table as a *figure*. The CSV link and
  notes glued under the table follow it.
- Launch buttons: sphinx-book-theme builds Binder/Colab URLs from the page's path
  (``book/_generated/<name>.ipynb``, an executed notebook that is not in the repository).
  They are rewritten to the committed ``notebooks/<name>.ipynb`` (jupytext, no outputs);
  a notebook page with no committed notebook fails the build rather than link nowhere.
- ``cxrcore.css``: tables wrap their text; the build's banner is easy to tell apart.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives as spec
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def _paste_table_directive():
    # imported lazily: myst_nb must be set up first (its glue domain owns the directive)
    from myst_nb.core.render import MimeData
    from myst_nb.core.variables import RetrievalError
    from myst_nb.ext.glue.utils import glue_warning, retrieve_glue_data
    from myst_nb.ext.utils import DirectiveBase

    class PasteTableDirective(DirectiveBase):
        """Paste a glued ``cxrcore.report`` table as a numbered, captioned table."""

        required_arguments = 1  # the key
        final_argument_whitespace = True
        has_content = True  # the caption (first paragraph) and an optional legend
        option_spec = {"name": spec.unchanged, "class": spec.class_option, "align": spec.unchanged}

        def run(self):
            key = self.arguments[0]
            try:
                result = retrieve_glue_data(self.document, key)
            except RetrievalError as exc:
                return [glue_warning(str(exc), self.document, self.line)]
            if "text/markdown" not in result.data:
                return [glue_warning(f"{key!r} was not glued by cxrcore.report.publish_table (no text/markdown); "
                                     "publish tables with publish_table", self.document, self.line)]
            cell_key = result.nb_renderer.config.cell_metadata_key
            mime = MimeData("text/markdown", result.data["text/markdown"],
                            cell_metadata={cell_key: {"markdown_format": "myst"}},
                            output_metadata=result.metadata, line=self.line)
            pasted = result.nb_renderer.render_markdown(mime)
            tables = [n for n in pasted if isinstance(n, nodes.table)]
            if len(tables) != 1:
                return [glue_warning(f"{key!r}: expected one table in the glued markdown, found {len(tables)}",
                                     self.document, self.line)]
            table = tables[0]
            table["classes"] += ["cxr-table"] + self.options.get("class", [])
            if "align" in self.options:
                table["align"] = self.options["align"]
            self.options.setdefault("name", key)
            self.add_name(table)
            extra = []
            if self.content:
                holder = nodes.Element()
                self.state.nested_parse(self.content, self.content_offset, holder)
                first = holder[0]
                if not isinstance(first, nodes.paragraph):
                    return [glue_warning("a table caption must be a paragraph", self.document, self.line)]
                title = nodes.title(first.rawsource, "", *first.children)
                title.source, title.line = first.source, first.line
                table.insert(0, title)
                extra = list(holder[1:])
            else:
                LOGGER.warning(f"{{glue:table}} {key}: no caption; every table needs one (and a number)",
                               location=(self.env.docname, self.lineno), type="cxrcore", subtype="caption")
            self.set_source_info(table)
            return pasted + extra

    return PasteTableDirective


def _launch_target(app, pagename: str) -> str | None:
    """The repository notebook a generated page launches, or None if the page is not generated."""
    prefix = app.config.cxrcore_generated_prefix.strip("/") + "/"
    if not pagename.startswith(prefix):
        return None
    return f"{app.config.cxrcore_notebooks_dir.strip('/')}/{pagename[len(prefix):]}.ipynb"


def rewrite_launch_buttons(app, pagename, templatename, context, doctree):
    """Point Binder/Colab/JupyterHub at the committed notebook, not the executed page."""
    groups = [b for b in context.get("header_buttons", []) if b.get("label") == "launch-buttons"]
    if not groups:
        return
    target = _launch_target(app, pagename)
    page_path = f"{pagename}.ipynb"
    root = Path(app.config.cxrcore_repo_root or app.srcdir)
    if target is None or not (root / target).is_file():
        LOGGER.warning(f"{pagename}: launch buttons would open {page_path}, which is not in the repository, and "
                       f"{target or 'no notebooks/ file'} does not exist; run `python book/build.py --sync-notebooks`",
                       type="cxrcore", subtype="launch")
        context["header_buttons"] = [b for b in context["header_buttons"] if b.get("label") != "launch-buttons"]
        return
    # the theme writes the page's path as <path_to_docs>/<pagename>.ipynb ("./book/..." for path_to_docs ".")
    docs = app.config.html_theme_options.get("path_to_docs", "").strip("/")
    theme_path = f"{docs}/{page_path}" if docs else page_path
    for group in groups:
        for button in group.get("buttons", []):
            if "url" in button:
                if theme_path not in button["url"]:
                    raise RuntimeError(f"{pagename}: launch URL {button['url']} does not name {theme_path}; "
                                       "sphinx-book-theme changed how it builds launch URLs (see its header_buttons/launch.py)")
                button["url"] = button["url"].replace(theme_path, target)


def add_static(app, config):
    config.html_static_path.append(str(STATIC))


def setup(app):
    app.setup_extension("myst_nb")
    app.add_config_value("cxrcore_repo_root", "", "html")
    app.add_config_value("cxrcore_notebooks_dir", "notebooks", "html")
    app.add_config_value("cxrcore_generated_prefix", "book/_generated", "html")
    app.add_directive_to_domain("glue", "table", _paste_table_directive())
    app.connect("config-inited", add_static)
    app.add_css_file("cxrcore.css")
    # after sphinx-book-theme's add_launch_buttons (priority 501)
    app.connect("html-page-context", rewrite_launch_buttons, priority=502)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
