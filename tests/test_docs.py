"""The README and the pages under docs/ link only to files, and headings, that exist."""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def anchors(path):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as '-'."""
    with open(path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: os.path.relpath(page, REPO))
def test_relative_links_and_images_point_to_existing_files_and_headings(page):
    with open(page) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # not inside code blocks
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # [text](target) and ![alt](target)
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        path = os.path.join(os.path.dirname(page), path) if path else page
        if not os.path.exists(path):
            problems.append(f"{target}: no such file")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            problems.append(f"{target}: no such heading")
    assert not problems, f"{os.path.relpath(page, REPO)}: {problems}"
