"""Sphinx configuration for the alignbook site; docs/build.py prepares the sources it renders."""
project = "alignbook"
author = "alignbook contributors"
copyright = "2026, alignbook contributors"

extensions = [
    "myst_nb",  # notebooks and MyST Markdown
    "sphinx.ext.autodoc",  # one API page per module
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # ships MathJax 3 with the site, so equations render without internet
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
nb_execution_mode = "off"  # docs/build.py already executed the notebooks the way nbdev_test does
nb_merge_streams = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
html_theme = "sphinx_book_theme"
html_title = "alignbook"
html_theme_options = {"show_toc_level": 2, "repository_url": "https://github.com/alignbook/alignbook",
                      "use_repository_button": False}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]
