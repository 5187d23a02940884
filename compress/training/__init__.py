"""Training stages: the method contract (:mod:`.method`), the shared loop (:mod:`.loop`) and
its checkpoints (:mod:`.checkpoint`)."""
