# On Google Colab: fetch the course (code, shipped weights, benchmark results) and install it.
# Elsewhere `make lab` has already done this and the cell does nothing.
import sys
if "google.colab" in sys.modules:
    !git clone -q --depth 1 https://github.com/effml/effml /content/effml
    %pip install -q -e "/content/effml[dev]"
    sys.path.insert(0, "/content/effml")  # the editable install is visible without a restart
