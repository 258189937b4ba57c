"""Server side: aggregation of a round's uploads and how the result is applied."""
