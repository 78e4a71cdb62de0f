"""Evaluation of a distilled student against its teachers (`jasper-jax eval`).

- `retrieval`: a labelled retrieval task built offline from the bundled held-out WordNet
  (usage example -> definition), nDCG@10 and recall@1, float and binary (Hamming) ranking;
- `robustness`: the same scores at every head, Matryoshka prefix and quantisation;
- `models`: the student (exported folder or workdir) and teachers behind one interface;
- `runner`: the whole evaluation, written as eval.json / eval.md / quality.png;
- `report`: markdown tables and the plot;
- `mteb_adapter`: run the model under the `mteb` benchmark package.
"""
