"""The plugin's own test, as its author would write it: distill's conformance kit on the class."""

from distill.testing import check_divergence
from distill_hellinger import Hellinger


def test_hellinger_is_a_conforming_divergence():
    check_divergence(Hellinger)
