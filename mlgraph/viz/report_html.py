"""The report's HTML: small builders for its parts (figures as data URIs, tables, collapsed
blocks) and the page, from the package's template `report_template.html` (`string.Template`;
no web framework, no script, no font or stylesheet from anywhere: the page's
Content-Security-Policy lets it load inline images only)."""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.resources
import string
from collections.abc import Iterable, Sequence

TEMPLATE = "report_template.html"


@dataclasses.dataclass(frozen=True)
class Section:
    """One `<section>` of the page: its anchor `key`, heading `title` and HTML `body`."""

    key: str
    title: str
    body: str


def esc(value: object) -> str:
    """`value` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """`data:` URI of `data`: the file itself, base64, inside the page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(data: bytes, alt: str, caption: str = "", mime: str = "image/png") -> str:
    """A `<figure>` holding the image `data` inline, with `alt` text and an HTML `caption`."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(data, mime)}" alt="{esc(alt)}">{cap}</figure>'


def grid(items: Iterable[str], cls: str = "grid") -> str:
    """`items` side by side, wrapping."""
    return f'<div class="{cls}">{"".join(items)}</div>'


def table(header: Sequence[str], rows: Iterable[Sequence[object]], text_columns: int = 1) -> str:
    """A table; the first `text_columns` columns are left-aligned text, the others numbers
    (floats with two decimals). Cells are escaped."""

    def cell(i: int, value: object, tag: str) -> str:
        cls = ' class="name"' if i < text_columns else ""
        shown = f"{value:.2f}" if isinstance(value, float) else value
        return f"<{tag}{cls}>{esc(shown)}</{tag}>"

    head = "".join(cell(i, h, "th") for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def details(summary: str, body: str) -> str:
    """A collapsed block: `summary` (text) shown, `body` (HTML) on a click."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def definitions(items: Iterable[tuple[str, str]]) -> str:
    """A list of (term, HTML value) pairs."""
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def missing(text: str) -> str:
    """A note that a part is not drawn and why (the `warning:` line's text)."""
    return f'<p class="missing">{esc(text)}</p>'


def page(title: str, subtitle: str, sections: Sequence[Section], footer: str, version: str) -> str:
    """The whole page: the template filled with the sections (and a link to each)."""
    template = importlib.resources.files("mlgraph.viz").joinpath(TEMPLATE).read_text("utf-8")
    nav = "".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{esc(s.key)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return string.Template(template).substitute(
        title=esc(title),
        subtitle=esc(subtitle),
        nav=nav,
        sections=body,
        footer=esc(footer),
        version=esc(version),
    )
