"""The Kopf operator: pure planner, thin handlers, a small cluster interface."""
