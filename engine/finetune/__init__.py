"""Fine-tuning a pre-trained DupMAE encoder into the paper's retriever (section 3.4): the task the shared
trainer runs (`task.py`), its training data (`data.py`), hard-negative mining (`mine.py`)."""
