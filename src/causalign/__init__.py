"""causalign: causally aligned medical-image classifiers, their explanations and audits."""

__version__ = "0.1.0"
