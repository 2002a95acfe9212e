package jobwatch

// ChannelName returns the notification channel of a job table: for a plain
// table name IHP's "job_available_<table>", for a schema-qualified one
// "job_available_<schema>.<table>", shortened with a hash suffix when it
// would pass PostgreSQL's 63-byte limit. Quoted parts keep their case.
//
// A name that cannot be a table name (see [ErrInvalidTableName]) gets a
// channel that no trigger of this package ever notifies.
func ChannelName(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return ownName("jobwatch_invalid_", tableName)
	}
	return n.channel
}
