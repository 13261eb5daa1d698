"""The data path, one module per step: ``readers`` (files) -> ``records`` (row schemas, validation) -> ``loading`` /
``mixing`` (sources, splits) -> ``formatting`` (how a row is formatted) -> ``tokenization`` (ids, labels) ->
``packing`` (rows, collator) -> ``preprocess`` (tokenize and cache; ``cache``, ``streaming``). ``arrow`` is the row
format they share; ``wiring`` connects a run's config to them."""
