"""The paper report (`semid paper-report`): PAPER.md's findings measured on our data."""
