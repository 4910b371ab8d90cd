"""The Flower adapters: one ``Strategy`` (:class:`HOSFLStrategy`) and one ``ClientApp``
(:func:`build_client_app`) that run any registered protocol."""
