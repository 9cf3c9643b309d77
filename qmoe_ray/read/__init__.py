"""The read side: loading a compressed checkpoint (encoded weights and their products), evaluation,
export and inspection."""
