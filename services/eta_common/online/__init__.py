"""The online store, one concern per module (the public surface is :mod:`eta_common.online_store`).

=================  ===================================================================================
module             what it holds
=================  ===================================================================================
``keys``           the Redis key layout (hash tags: one restaurant, one city, one row bucket per slot)
``lua/*.lua``      the server-side scripts, loaded at start (``scripts``)
``updates``        the update tuples the aggregator applies, derived from events
``writer``         applying updates, re-materialising ready rows, the due registry, the supply counts
``exact``          the exact read from the sorted sets (the source of truth; ``as_of`` and fallback)
``rows``           the ready row's format and its parsing
``assemble``       turning either read into a :class:`~eta_common.feature_block.FeatureBlock`
``reader``         the serving read: ready rows first, the exact read for rows not valid at ``now``
``geo``            Redis GEO's own arithmetic (geohash decoding, distance counts) for bulk supply counts
=================  ===================================================================================
"""
