"""Copy tables from a generated markdown file into a document, between markers.

    python scripts/fill_tables.py benchmarks/results/study_split0/tables.md docs/comparison.md

A block ``<!-- table: PREFIX -->`` ... ``<!-- /table -->`` in the document is replaced by the
table of the source whose bold title starts with PREFIX (title line, blank line, table), so the
numbers in the docs are the generated ones, never retyped.
"""
import re
import sys


def tables(source: str) -> dict:
    """bold title -> its block: the title line down to the end of the first table below it."""
    out, lines = {}, source.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith('**'):
            continue
        j, seen_table = i + 1, False
        while j < len(lines) and not lines[j].startswith('**'):
            if lines[j].startswith('|'):
                seen_table = True
            elif seen_table:
                break
            j += 1
        title = line.split('**')[1]
        out[title] = '\n'.join(lines[i:j]).rstrip()
    return out


def fill(document: str, source: str) -> str:
    found = tables(source)

    def replace(match):
        prefix = match.group(1)
        hits = [t for title, t in found.items() if title.startswith(prefix)]
        if len(hits) != 1:
            raise SystemExit(f'{len(hits)} tables start with {prefix!r}')
        return f'<!-- table: {prefix} -->\n{hits[0]}\n<!-- /table -->'
    return re.sub(r'<!-- table: (.*?) -->.*?<!-- /table -->', replace, document, flags=re.S)


if __name__ == '__main__':
    src, doc = sys.argv[1], sys.argv[2]
    text = fill(open(doc).read(), open(src).read())
    open(doc, 'w').write(text)
