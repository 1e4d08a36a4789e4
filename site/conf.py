# Sphinx configuration of the course's website. tools/build_site.py stages the pages into
# build/site/src and runs `sphinx-build -c site build/site/src build/site/html`; see site/README.md.
# Everything a page loads is bundled: MathJax 3 comes from the sphinx-mathjax-offline wheel, the theme's
# scripts, styles and icon fonts from its own wheel; nothing is fetched from a CDN, and notebooks are
# rendered from their committed outputs, never executed.

project = "effml"
author = "the effml authors"
copyright = "the effml authors"

extensions = [
    "myst_nb",  # notebooks (.ipynb) and MyST Markdown (.md)
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax; sets mathjax_path to it
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
root_doc = "index"

# The notebooks are committed executed: the site shows those outputs and never runs a cell.
nb_execution_mode = "off"
# myst-nb would load require.js and the widget manager from a CDN for notebooks with widget state. The
# build replaces each widget by a static fallback instead (tools/build_site.py), so no widget script.
nb_ipywidgets_js = {}
nb_merge_streams = True

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "html_image", "attrs_inline"]
myst_heading_anchors = 3
# An undefined macro is a TeX error (MathJax shows it as one, and the browser test looks for errors),
# not red text: MathJax's noundefined package is left out.
mathjax3_config = {"tex": {"packages": {"[-]": ["noundefined"]}}}

html_theme = "sphinx_book_theme"
html_title = "effml: making LLMs efficient"
html_static_path = ["static"]
html_css_files = ["effml.css"]
# a favicon of our own: without one, every browser asks the host for /favicon.ico
html_favicon = "static/favicon.svg"
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {
    # no launch buttons (Binder, Colab), no repository buttons, no analytics: nothing that reaches out
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
# light or dark as the reader's system is (unset, the theme logs an error in the console)
html_context = {"default_mode": "auto"}

# Warnings are errors in the build script (-W); these are expected and harmless.
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]
