"""Reads a page vlcap/gallery.py wrote as a browser would show it, with the standard library's HTML parser."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """What a browser would show: the rows of the pictures table as lists of cell texts, and every tag and its attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.rows, self.cell, self.table = [], [], None, 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table" and dict(attrs).get("class") == "pictures":
            self.table = 1
        elif tag == "tr" and self.table:
            self.rows.append([])
        elif tag == "td" and self.table:
            self.cell = []
            self.rows[-1].append(self.cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None
        elif tag == "table":
            self.table = 0

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def cells(self) -> list[list[str]]:
        """Each picture's row as cell texts (whitespace-joined), without the header row."""
        return [[" ".join(" ".join(c).split()) for c in row] for row in self.rows if row]

    def images(self) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == "img"]
