"""The whole system on one machine, for ``elasti-istio demo`` and the end-to-end tests."""
