"""The ranker family: token parameterizations, examples, the DLRM model, its training stage, evaluation,
promotion and the topic-match probe."""
