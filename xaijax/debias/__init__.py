"""The debiasing study of the research (issue 24, part 3): a synthetic NLI corpus with a planted
gender bias (:mod:`xaijax.data.nli_corpus`), the compensatory debiasing objective (Woo et al.,
ICASSP 2023) and the Auto-Debias baseline (Guo et al., ACL 2022) (:mod:`.objectives`), training
(:mod:`.train`) and the study itself (:mod:`.study`: bias table, accuracy, token figure).

Submodules are imported on use (``from xaijax.debias import study``), so importing the package
costs nothing.
"""
