mock_data "aws_region" {
  defaults = { name = "eu-west-1" }
}
mock_data "aws_subnet" {
  defaults = { availability_zone = "eu-west-1a" }
}
mock_resource "aws_iam_instance_profile" {
  defaults = { arn = "arn:aws:iam::123456789012:instance-profile/kafka-node-1" }
}
mock_resource "aws_launch_template" {
  defaults = { id = "lt-0123456789abcdef0", latest_version = 1 }
}
mock_resource "aws_dynamodb_table" {
  defaults = { arn = "arn:aws:dynamodb:eu-west-1:123456789012:table/kafka-cps-relocation" }
}
mock_resource "aws_iam_role" {
  defaults = { arn = "arn:aws:iam::123456789012:role/kafka-dlm-1" }
}
