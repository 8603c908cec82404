"""What every experiment shares, written once: the stage cache (`stages`), the model's own
answers (`answers`), prompt sets, model loading, score units (`scoring`), mask selection from
score units (`selection`), fine-tuning settings (`training`), averages (`measure`) and report
writing (`report`). Nothing here imports an experiment."""
