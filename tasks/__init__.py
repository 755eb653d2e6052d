"""edgeqa stage logic. One module per DVC stage; nothing here imports Prefect or `flows`."""
